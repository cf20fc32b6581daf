"""Debian's docker-compose (the Python Compose, 1.29), installed with apt by the project itself
to check deploy/compose.yaml without a container daemon: `docker-compose config` validates the
file against the Compose schema and resolves its variables, and needs no daemon for that
(tests/test_deploy_files.py). Nothing here runs a container.

    python -m services.compose install
"""

from __future__ import annotations

import sys
from pathlib import Path

from services import apt
from services.process import CACHE_DIR, ServiceError

# Debian 12's docker-compose, pinned (its Python dependencies come from the same release).
COMPOSE_PACKAGE_VERSION = "1.29.2-3"
DOCKER_COMPOSE = Path("/usr/bin/docker-compose")


class ComposeError(ServiceError):
    """docker-compose could not be installed."""


def install(version: str = COMPOSE_PACKAGE_VERSION) -> Path:
    apt.install({"docker-compose": version}, CACHE_DIR / "compose", ComposeError)
    if not DOCKER_COMPOSE.is_file():
        raise ComposeError(f"apt-get installed docker-compose {version} but there is no {DOCKER_COMPOSE}")
    return DOCKER_COMPOSE


if __name__ == "__main__":
    sys.exit(apt.install_command(sys.argv[1:], __doc__, install))
