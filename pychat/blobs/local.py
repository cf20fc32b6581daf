"""Blobs as files in a local folder: `<root>/<key[:2]>/<key>` (two-level, so no directory grows past
a few thousand entries on a busy server)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO


class _FileReader:
    def __init__(self, f: BinaryIO, length: int | None) -> None:
        self._f = f
        self._left = length

    def read(self, size: int) -> bytes:
        if self._left is not None:
            size = min(size, self._left)
            if size <= 0:
                return b""
        data = self._f.read(size)
        if self._left is not None:
            self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return self.root / key[:2] / key

    def put(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(exist_ok=True)
        # A name of this call's own: two uploads of the same bytes may put the same key at once.
        tmp = target.with_name(f".{key}.{secrets.token_hex(8)}.tmp")
        # A hard link when the upload spool is on the same file system (the default layout): no copy.
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open(self, key: str, start: int = 0, length: int | None = None) -> _FileReader:
        f = open(self._path(key), "rb")  # noqa: SIM115 - the reader closes it
        f.seek(start)
        return _FileReader(f, length)

    def move(self, key: str, to: str) -> bool:
        target = self._path(to)
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(self._path(key), target)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
