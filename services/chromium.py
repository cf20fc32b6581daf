"""Debian's Chromium for the browser tests of the web page (driven by Playwright for Python, whose
own browser download cannot work on these machines), installed with apt by the project itself.

    python -m services.chromium install
"""

from __future__ import annotations

import sys
from pathlib import Path

from services import apt
from services.process import CACHE_DIR, ServiceError

# Debian 12's security update of chromium, pinned (with the chromium-common it needs exactly).
CHROMIUM_PACKAGE_VERSION = "156.0.8078.129-1~deb12u1"
CHROMIUM = Path("/usr/bin/chromium")
# What the tests launch it with: headless; no background requests (this machine has no network
# but loopback: Chromium's own connections would only fail, many at a time).
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


class ChromiumError(ServiceError):
    """Chromium could not be installed."""


def install(version: str = CHROMIUM_PACKAGE_VERSION) -> Path:
    apt.install({"chromium": version, "chromium-common": version}, CACHE_DIR / "chromium", ChromiumError)
    if not CHROMIUM.is_file():
        raise ChromiumError(f"apt-get installed chromium {version} but there is no {CHROMIUM}")
    return CHROMIUM


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print(__doc__, file=sys.stderr)
        return 2
    print(install())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
