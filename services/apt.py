"""Debian packages the project installs itself, each at an exact version (a security update
changes it here, on purpose): `apt-get install name=version ...` as root, once, under a lock so
that several processes may ask at the same time."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from services.process import ServiceError, command_output_tail, install_lock

# Asked by invoke-rc.d whether a package's maintainer scripts may start its service (Debian policy).
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_DENY_ALL = """\
#!/bin/sh
# Written by pychat's services/apt.py for the length of one apt-get install, removed after:
# the packages it installs start no service (exit 101: action forbidden by policy).
exit 101
"""


@contextlib.contextmanager
def services_kept_stopped() -> Iterator[None]:
    """While it is held, packages being installed start no service (a web server's package would
    start one as root, on port 80): a policy-rc.d that forbids every start, written only where
    there is none (a machine's own policy, such as a container image's, stays as it is)."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(_DENY_ALL)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


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


def install(
    packages: dict[str, str],
    lock_dir: Path,
    error: type[ServiceError] = ServiceError,
    keep_stopped: bool = False,
) -> None:
    """Installs each package at its version unless every one already is; raises `error` saying why not.
    With `keep_stopped`, the packages' own services are not started (`services_kept_stopped`)."""

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
        with services_kept_stopped() if keep_stopped else contextlib.nullcontext():
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


def install_command(argv: list[str], usage: str | None, install: Callable[[], Path]) -> int:
    """`python -m services.NAME install` for a module that only installs a package: prints the
    installed program's path (or the usage, for anything else)."""
    if argv != ["install"]:
        print(usage, file=sys.stderr)
        return 2
    print(install())
    return 0
