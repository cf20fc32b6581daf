"""Debian packages the project installs itself, each at an exact version (a security update
changes it here, on purpose): `apt-get install name=version ...` as root, once, under a lock so
that several processes may ask at the same time."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

from services.process import ServiceError, command_output_tail, install_lock


def installed_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return None
    done = subprocess.run(
        [dpkg_query, "--show", "--showformat=${Status}|${Version}", package],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = done.stdout.partition("|")
    return version if done.returncode == 0 and status == "install ok installed" else None


def install(packages: dict[str, str], lock_dir: Path, error: type[ServiceError] = ServiceError) -> None:
    """Installs each package at its version unless every one already is; raises `error` saying why not."""

    def current() -> bool:
        return all(installed_version(name) == version for name, version in packages.items())

    if current():
        return
    wanted = " ".join(f"{name}={version}" for name, version in packages.items())
    with install_lock(lock_dir):
        if current():  # installed meanwhile
            return
        apt_get = shutil.which("apt-get")
        if apt_get is None:
            raise error(f"apt-get is needed to install {wanted}; it is not on PATH")
        if os.geteuid() != 0:
            raise error(f"installing {wanted} needs root: apt-get install {wanted}")
        command = [
            apt_get,
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            *wanted.split(),
        ]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run = partial(
            subprocess.run, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, env=env
        )
        done = run(command)
        if done.returncode != 0:
            # A fresh machine has no package lists, an old one may list only older versions.
            run([apt_get, "update", "-q", "-o", "DPkg::Lock::Timeout=300"])
            done = run(command)
        if done.returncode != 0:
            raise error(
                f"apt-get could not install {wanted} (exit {done.returncode}):\n" + command_output_tail(done)
            )
        if not current():
            raise error(f"apt-get ran but did not leave {wanted} installed")
