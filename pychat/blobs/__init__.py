"""The `BlobStore` seam: where the bytes of media live, by content (the sha256 of the bytes).

Two implementations, one module each, picked by the `media_store` setting:

- empty or `file:///path` (empty: `data_dir/media`): a local folder, the embedded default,
  `pychat.blobs.local`;
- `s3://bucket?endpoint=http://host:port&region=...`: any S3-compatible server (credentials from the
  usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`), `pychat.blobs.s3`.

A blob is written once from a finished local file (the upload, spooled to disk while its sha256 was
computed) and never changed: the same key always holds the same bytes. Every method is synchronous
and may block: callers run them on a thread, never on the asyncio loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from pychat.extras import missing


class BlobReader(Protocol):
    """An open blob, read front to back from where it was opened."""

    def read(self, size: int) -> bytes: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    def put(self, key: str, path: Path) -> None:
        """Stores the file at `path` as `key` (replacing what is there: the same key always has the
        same bytes). Large files go in parts; `path` is left as it is."""

    def exists(self, key: str) -> bool: ...

    def open(self, key: str, start: int = 0, length: int | None = None) -> BlobReader:
        """The blob's bytes from `start`, `length` of them (None: to the end). FileNotFoundError if
        there is no such blob."""

    def move(self, key: str, to: str) -> bool:
        """Renames a blob (garbage collection sets one aside before deleting it); False if `key`
        does not exist."""

    def delete(self, key: str) -> None:
        """Removes the blob; no error if it is not there."""

    def close(self) -> None: ...


def open_blob_store(url: str, data_dir: Path) -> BlobStore:
    """The blob store a `media_store` setting names."""
    parts = urlsplit(url or "file://")
    if parts.scheme == "file":
        from pychat.blobs.local import LocalBlobStore

        return LocalBlobStore(Path(parts.path) if parts.path not in ("", "/") else data_dir / "media")
    if parts.scheme == "s3":
        try:
            from pychat.blobs.s3 import S3BlobStore
        except ModuleNotFoundError as e:
            raise missing("s3", e) from None
        return S3BlobStore.from_url(url)
    raise ValueError(f"unknown media store {url!r}: use file:///path or s3://bucket?endpoint=URL")
