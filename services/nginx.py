"""Debian's nginx for the reverse-proxy test of deploy/nginx/ (tests/test_deploy_proxy.py),
installed with apt by the project itself.

    python -m services.nginx install

The package would start nginx as a root daemon on port 80; it is installed with its service kept
stopped (services/apt.py) and, where systemd runs, not enabled at boot either. The test runs its
own nginx in the foreground, with its config, pid file, logs and temp files in a directory of its
own, on free ports of 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from services import apt
from services.process import CACHE_DIR, ServiceError

# Debian 12's security update of nginx, pinned (with the nginx-common it needs exactly). The
# proxy image of the Dockerfile installs the same version.
NGINX_PACKAGE_VERSION = "1.22.1-9+deb12u12"
NGINX_VERSION = "1.22.1"
NGINX = Path("/usr/sbin/nginx")


class NginxError(ServiceError):
    """nginx could not be installed."""


def install(version: str = NGINX_PACKAGE_VERSION) -> Path:
    """Returns the path of `nginx`, installing Debian's package at exactly `version` (with apt, as
    root) only when it is missing or another version; a fresh install starts no daemon."""
    fresh = apt.installed_version("nginx") is None
    apt.install(
        {"nginx": version, "nginx-common": version}, CACHE_DIR / "nginx", NginxError, keep_stopped=True
    )
    systemctl = shutil.which("systemctl")
    if fresh and systemctl is not None and Path("/run/systemd/system").is_dir():
        # The package enables nginx.service for the next boot: this machine did not ask for it.
        subprocess.run([systemctl, "disable", "--quiet", "nginx.service"], check=False, capture_output=True)
    if not NGINX.is_file():
        raise NginxError(f"apt-get installed nginx {version} but there is no {NGINX}")
    return NGINX


if __name__ == "__main__":
    sys.exit(apt.install_command(sys.argv[1:], __doc__, install))
