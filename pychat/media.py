"""Media: uploads streamed to disk while hashed, typed from their bytes, thumbnailed, stored once per
content in a `BlobStore`; downloads with ranges; garbage collection and the upload quota.

An upload is spooled to a file under `data_dir/uploads` (never held in memory: the body arrives
in chunks, handed to a thread a megabyte at a time) while its sha256 is computed; over the size
limit it stops at once and the file is removed. The type comes from the first bytes (magic
numbers), never from the request. Images get their dimensions and a WebP thumbnail (Pillow),
with decompression bombs refused by their pixel count before anything is decoded. Then the blob
is put (unless a blob with those bytes exists already) and the upload's row is written.

Garbage collection removes uploads never posted in a message once they are older than
`media_unattached_age_s`, then the blobs no row points to any more. Deleting a blob that an upload
of the same bytes is taking at that moment is the race to avoid: the collector first moves the
blob aside, then looks again for rows, and moves it back if one appeared; an upload writes its row
first and then checks that its blob is there, putting it again if not. Every interleaving of the
two ends with the blob present under each row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

from pychat.blobs import BlobReader, BlobStore
from pychat.config import Config
from pychat.errors import ApiError, RateLimited
from pychat.ids import new_id, now_ms
from pychat.store import Media, Store

log = logging.getLogger("pychat.media")

# Bytes handed to the spool thread at once, and read from a blob per chunk of a download.
SPOOL_CHUNK = 1024 * 1024
READ_CHUNK = 256 * 1024
# What a multipart body may carry beside its file (framing, small fields).
MULTIPART_SLACK = 64 * 1024
# Upload bytes written between two fdatasyncs of the spool file.
SYNC_EVERY = 1024 * 1024
# The first bytes kept for sniffing the type.
HEAD_BYTES = 4096
DAY_MS = 86_400_000
# Threads for media's disk and blob store work (spooling, typing, thumbnails, putting and reading
# blobs), at a lower CPU priority than the rest of the server: on a busy box, chat goes first.
MEDIA_THREADS = 8
MEDIA_NICE = 10
IMAGE_DECODES = 1
# Uploads the collector looks at per round.
GC_BATCH = 500

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
THUMBNAIL_TYPE = "image/webp"


# ISO base media files (`ftyp`) by their major brand; any other brand is MP4 video.
_ISO_BRANDS = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"msf1": "image/heif",
    b"avif": "image/avif",
    b"qt  ": "video/quicktime",
    b"M4A ": "audio/mp4",
    b"M4B ": "audio/mp4",
    b"3gp4": "video/3gpp",
    b"3gp5": "video/3gpp",
}


def sniff(head: bytes) -> str:
    """The content type of a file from its first bytes. Only what is recognised is named; text is
    served as plain text (an HTML file never as HTML), anything else as bytes."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"PK\x03\x04"):
        return "application/zip"
    if head.startswith(b"\x1f\x8b"):
        return "application/gzip"
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "video/mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if _is_text(head):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    for cut in range(4):  # the head may end inside a character
        try:
            head[: len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


class Spool:
    """An upload on its way to disk: the file, its sha256 and size so far, its first bytes."""

    def __init__(self, directory: Path, limit: int, pool: Executor) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._pool = pool
        self.path = directory / new_id("up")
        self.limit = limit
        self.size = 0
        self.head = b""
        self._sha = hashlib.sha256()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by finish() or discard()
        self._pending: list[bytes] = []
        self._unsynced = 0
        self._pending_size = 0

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def feed(self, data: bytes) -> None:
        """Takes the next bytes of the body; too_large past the limit (the caller discards)."""
        if not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            raise ApiError("too_large", f"the upload is larger than {self.limit} bytes")
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= SPOOL_CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            await asyncio.get_running_loop().run_in_executor(self._pool, self._write, data)

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._file.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            # Written out as it comes instead of all at the end: a large amount of dirty upload
            # data makes every fsync on the disk wait for it, the message path's commits included.
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    async def finish(self) -> None:
        """Writes what is left and makes the file durable (a blob may be a hard link to it)."""
        await self.flush()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._sync)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class ImageInfo:
    width: int
    height: int
    thumbnail: Path | None


def inspect_image(
    path: Path, content_type: str, max_pixels: int, thumb_px: int, out: Path
) -> ImageInfo | None:
    """The dimensions of an image and a WebP thumbnail of it in `out`; None if the bytes do not
    decode as the type they start like. Refuses (too_large) an image of more than `max_pixels`
    pixels before decoding it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[IMAGE_TYPES[content_type]]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ApiError(
                        "too_large", f"the image has {width}x{height} pixels; at most {max_pixels} are taken"
                    )
                # Shrunk first (a JPEG is decoded at a reduced scale), turned upright after: the
                # full-size image is never copied.
                img.thumbnail((thumb_px, thumb_px))
                thumb = ImageOps.exif_transpose(img)
                if thumb.mode not in ("RGB", "RGBA"):
                    thumb = thumb.convert(
                        "RGBA" if "A" in thumb.getbands() or "transparency" in img.info else "RGB"
                    )
                thumb.save(out, "WEBP", quality=80)
                return ImageInfo(width, height, out)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError("too_large", f"the image decodes to more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as e:
        log.info("an upload that starts like %s does not decode: %s", content_type, e)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        return None


class BlobStream:
    """An open blob read a chunk at a time on a media thread; `aclose` (always called by whoever
    sends it, also when nothing was sent) closes the reader."""

    def __init__(self, reader: BlobReader, key: str, length: int, pool: Executor) -> None:
        self._reader: BlobReader | None = reader
        self._key = key
        self._left = length
        self._pool = pool

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._left <= 0 or self._reader is None:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        chunk = await loop.run_in_executor(self._pool, self._reader.read, min(READ_CHUNK, self._left))
        if not chunk:
            raise OSError(f"blob {self._key} ended {self._left} bytes early")
        self._left -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, reader.close)


@dataclass(frozen=True)
class ByteRange:
    start: int
    length: int


def parse_range(header: str | None, size: int) -> ByteRange | str | None:
    """The one range a `Range: bytes=...` header asks of a `size`-byte body: None for the whole body
    (no header, another unit, several ranges, a malformed one: all may be ignored, RFC 9110), or
    "unsatisfiable" (416)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        n = min(n, size)
        return ByteRange(size - n, n) if size else "unsatisfiable"
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or (last and end < start):
        return "unsatisfiable"
    end = min(end, size - 1)
    return ByteRange(start, end - start + 1)


def disposition(media: Media, inline: bool) -> str:
    kind = "inline" if inline else "attachment"
    if not media.filename:
        return kind
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", media.filename)[:128] or "file"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(media.filename, safe='')}"


def _filename(value: str | None) -> str | None:
    """A file name a client gave, as a name and not a path, or None."""
    if not value:
        return None
    name = value.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch.isprintable())[:255]
    return name or None


StoreCall = Callable[..., Awaitable[Any]]

# When to try again an upload refused for what uploads under way reserved.
RESERVED_RETRY_MS = 1000


class UploadQuota:
    """Bytes a user may upload per rolling 24 hours (0: no quota). An upload reserves its bytes
    before it is kept: the check (what the store has plus what uploads under way reserved) and the
    reservation are one step under a lock, so parallel uploads cannot all pass the same check.
    Reservations are this process's: nodes of a cluster each let a user reach the quota."""

    def __init__(self, quota: int, store: Store, store_call: StoreCall) -> None:
        self.quota = quota
        self._store = store
        self._store_call = store_call
        self._reserved: dict[str, int] = {}
        # Also taken to release: a release between a check's store read and its sum would let
        # the check miss an upload both in the store and in the reservations.
        self._lock = asyncio.Lock()

    async def reserve(self, user_id: str, size: int) -> None:
        """Reserves `size` bytes more for the user, or raises RateLimited."""
        if self.quota <= 0:
            return
        async with self._lock:
            now = now_ms()
            used, oldest = await self._store_call(self._store.uploaded_since, user_id, now - DAY_MS)
            if used + self._reserved.get(user_id, 0) + size > self.quota:
                if used + size <= self.quota:  # it may fit once the uploads under way are done
                    raise RateLimited(RESERVED_RETRY_MS)
                wait = (oldest + DAY_MS - now) if oldest is not None else DAY_MS
                raise RateLimited(max(1000, wait))
            self._reserved[user_id] = self._reserved.get(user_id, 0) + size

    async def release(self, user_id: str, size: int) -> None:
        """Gives back a reservation (once the upload's row is stored, or the upload failed)."""
        if self.quota <= 0:
            return
        async with self._lock:
            left = self._reserved.pop(user_id, 0) - size
            if left > 0:
                self._reserved[user_id] = left


class MediaService:
    """Uploads, downloads and the collector, over one `Store` (rows) and one `BlobStore` (bytes).
    `store_call` runs a store call off the event loop (the REST API's, which turns an unreachable
    store into `unavailable`)."""

    def __init__(self, config: Config, store: Store, blobs: BlobStore, store_call: StoreCall) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self._store_call = store_call
        self.quota = UploadQuota(config.media_quota_bytes_per_day, store, store_call)
        # Typing, thumbnailing and putting blobs (seconds for a large file on S3): threads of
        # their own, so that uploads never hold up the REST API's store threads.
        self._pool = ThreadPoolExecutor(
            MEDIA_THREADS, thread_name_prefix="pychat-media", initializer=_lower_priority
        )
        # One image decoded at a time: a PNG of `max_image_pixels` takes 4 bytes a pixel while it is
        # shrunk, whatever the size of its file.
        self._decoding = threading.Semaphore(IMAGE_DECODES)
        self.spool_dir = config.data_dir / "uploads"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # Spool files left by a process that died mid-upload: nobody will finish them.
        for leftover in self.spool_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    # uploads

    async def upload(
        self,
        user_id: str,
        headers: dict[str, str],
        query: dict[str, str],
        receive: Callable[[], Awaitable[dict[str, Any]]],
    ) -> Media:
        limit = self.config.limits.max_upload_bytes
        declared = headers.get("content-length", "")
        reserved = 0
        try:
            if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
                raise ApiError("too_large", f"the upload is larger than {limit} bytes")
            size = int(declared) if declared.isdigit() else 0
            await self.quota.reserve(user_id, size)
            reserved = size
        except ApiError as e:
            await _refuse_body(e, receive, limit)
            raise
        spool: Spool | None = None
        try:
            spool = Spool(self.spool_dir, limit, self._pool)
            content_type = headers.get("content-type", "")
            try:
                if content_type.lower().startswith("multipart/form-data"):
                    filename = await _read_multipart(content_type, receive, spool)
                else:
                    await _read_body(receive, spool)
                    filename = _filename(query.get("filename"))
                    if filename is None:
                        _, params = parse_options_header(headers.get("content-disposition", ""))
                        filename = _filename(params.get(b"filename", b"").decode("utf-8", "replace"))
                if spool.size == 0:
                    raise ApiError("bad_request", "the upload is empty")
                await spool.finish()
            except ApiError as e:
                if e.code == "too_large":  # nothing is kept; the rest is read and dropped
                    spool.discard()
                    await _refuse_body(e, receive, limit)
                raise
            except OSError:  # the spool's disk (full, failing)
                log.exception("writing an upload to %s failed", self.spool_dir)
                spool.discard()
                error = ApiError("unavailable", "the server could not take the upload now; retry")
                await _refuse_body(error, receive, limit)
                raise error from None
            if spool.size > reserved:  # no Content-Length: counted once it has arrived
                await self.quota.reserve(user_id, spool.size - reserved)
                reserved = spool.size
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._pool, self._keep, user_id, spool, filename)
            except ApiError:
                raise
            except Exception:
                # The store or the blob store out of reach (or failing): nothing was acknowledged.
                log.exception("keeping an upload of %d bytes failed", spool.size)
                raise ApiError("unavailable", "the upload could not be stored; retry") from None
        finally:
            if spool is not None:
                spool.discard()
            await self.quota.release(user_id, reserved)

    def _keep(self, user_id: str, spool: Spool, filename: str | None) -> Media:
        """(On a thread.) Types the spooled file, thumbnails an image, puts the blobs, writes the row."""
        content_type = sniff(spool.head)
        info = None
        thumb_path = spool.path.with_name(spool.path.name + ".thumb")
        try:
            if content_type in IMAGE_TYPES:
                with self._decoding:
                    info = inspect_image(
                        spool.path,
                        content_type,
                        self.config.max_image_pixels,
                        self.config.thumbnail_px,
                        thumb_path,
                    )
                if info is None:
                    content_type = "application/octet-stream"
            thumb_sha = thumb_size = None
            if info is not None and info.thumbnail is not None:
                data = info.thumbnail.read_bytes()
                thumb_sha, thumb_size = hashlib.sha256(data).hexdigest(), len(data)
                self._put_once(thumb_sha, info.thumbnail)
            self._put_once(spool.sha256, spool.path)
            media = Media(
                media_id=new_id("md"),
                uploader_id=user_id,
                sha256=spool.sha256,
                content_type=content_type,
                size=spool.size,
                created_at=now_ms(),
                filename=filename,
                width=info.width if info else None,
                height=info.height if info else None,
                thumb_sha256=thumb_sha,
                thumb_size=thumb_size,
            )
            self.store.add_media(media)
            # The collector may have set a blob of the same bytes aside meanwhile (see the module's
            # docstring): with the row written, it will not delete it again; put it back if gone.
            if not self.blobs.exists(spool.sha256):
                self.blobs.put(spool.sha256, spool.path)
            if thumb_sha and info is not None and info.thumbnail and not self.blobs.exists(thumb_sha):
                self.blobs.put(thumb_sha, info.thumbnail)
            return media
        finally:
            with contextlib.suppress(FileNotFoundError):
                thumb_path.unlink()

    def _put_once(self, sha: str, path: Path) -> None:
        if not self.blobs.exists(sha):
            self.blobs.put(sha, path)

    # downloads

    async def readable(self, user_id: str, media_id: str) -> Media:
        """The media, if `user_id` may read it: 404 unknown, 403 for anyone else."""
        media: Media | None = await self._store_call(self.store.get_media, media_id)
        if media is None:
            raise ApiError("not_found", "no such media")
        if media.uploader_id != user_id and not await self._store_call(
            self.store.may_see_media, media_id, user_id
        ):
            raise ApiError("forbidden", "this media was not shared with you")
        return media

    async def open_stream(self, key: str, start: int, length: int) -> BlobStream:
        """The bytes of a blob, `length` of them from `start`. The blob is opened before this
        returns, so a missing one fails before any answer is sent."""
        loop = asyncio.get_running_loop()
        reader = await loop.run_in_executor(self._pool, self.blobs.open, key, start, length)
        return BlobStream(reader, key, length, self._pool)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.blobs.close()

    # garbage collection

    def collect(self, now: int | None = None) -> tuple[int, int]:
        """(On a thread.) Removes uploads never attached and older than the configured age, then
        the blobs no upload points to. (uploads removed, blobs deleted)."""
        cutoff = (now if now is not None else now_ms()) - self.config.media_unattached_age_s * 1000
        removed = deleted = 0
        while True:
            batch = self.store.unattached_media(cutoff, GC_BATCH)
            progress = 0
            for m in batch:
                if not self.store.remove_unattached(m.media_id):
                    continue  # posted meanwhile
                progress += 1
                for sha in {m.sha256, m.thumb_sha256} - {None}:
                    assert sha is not None
                    if not self.store.blob_in_use(sha):
                        deleted += self._delete_blob(sha)
            removed += progress
            if len(batch) < GC_BATCH or progress == 0:
                return removed, deleted

    def _delete_blob(self, sha: str) -> int:
        # A name of this attempt's own: collectors on other nodes may set the same blob aside too.
        aside = f"trash-{sha}-{secrets.token_hex(6)}"
        if not self.blobs.move(sha, aside):
            return 0
        if self.store.blob_in_use(sha):  # an upload of the same bytes came in meanwhile
            self.blobs.move(aside, sha)
            return 0
        self.blobs.delete(aside)
        return 1

    async def collect_forever(self) -> None:
        """Runs the collector every `media_gc_interval_s` (the first round soon after start)."""
        interval = max(1, self.config.media_gc_interval_s)
        await asyncio.sleep(min(interval, 5))
        while True:
            started = time.monotonic()
            try:
                removed, deleted = await asyncio.to_thread(self.collect)
                if removed or deleted:
                    log.info(
                        "media collector: %d unattached uploads removed, %d blobs deleted", removed, deleted
                    )
            except Exception:
                log.exception("the media collector failed; it runs again in %d s", interval)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def _lower_priority() -> None:
    # Linux schedules threads one by one: a media thread yields the CPU to the message path.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MEDIA_NICE)


async def _refuse_body(
    error: ApiError, receive: Callable[[], Awaitable[dict[str, Any]]], limit: int, seconds: float = 10.0
) -> None:
    """Reads and drops what is left of a refused body (up to `limit` more bytes, for a few seconds),
    so that the client, still sending, reads `error` instead of a reset connection. A body left
    unread closes the connection after the answer (`Connection: close`): a client that kept it
    for its next request would find it closed under that request."""
    deadline = time.monotonic() + seconds
    dropped = 0
    while dropped <= limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            message = await asyncio.wait_for(receive(), left)
        except (TimeoutError, ApiError):  # ApiError: the body stalled (RestApi's bound)
            break
        if message["type"] == "http.disconnect":
            return  # nobody to answer
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return  # read to its end: the connection can carry the next request
    error.extra_headers.append(("connection", "close"))


async def _read_body(receive: Callable[[], Awaitable[dict[str, Any]]], spool: Spool) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError("bad_request", "client disconnected")
        await spool.feed(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _read_multipart(
    content_type: str, receive: Callable[[], Awaitable[dict[str, Any]]], spool: Spool
) -> str | None:
    """Spools the first file part of a multipart/form-data body (the part with a filename, or
    named `file`); the other parts are skipped. Its file name."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError("bad_request", "a multipart body needs a boundary")
    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "in_file": False, "done": False}
    chunks: list[bytes] = []
    filename: list[str | None] = [None]

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, p = parse_options_header(state["headers"].get(b"content-disposition", b""))
        is_file = b"filename" in p or p.get(b"name") == b"file"
        state["in_file"] = is_file and not state["done"]
        if state["in_file"]:
            filename[0] = _filename(p.get(b"filename", b"").decode("utf-8", "replace"))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["in_file"]:
            chunks.append(data[start:end])

    def on_part_end() -> None:
        if state["in_file"]:
            state["done"] = True
            state["in_file"] = False

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
    except Exception as e:  # e.g. a boundary longer than the parser takes
        raise ApiError("bad_request", f"a malformed multipart body: {e}") from None
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError("bad_request", "client disconnected")
        body = message.get("body", b"")
        received += len(body)
        if received > spool.limit + MULTIPART_SLACK:  # the other parts count too
            raise ApiError("too_large", f"the upload is larger than {spool.limit} bytes")
        try:
            parser.write(body)
        except Exception as e:  # the parser's own errors
            raise ApiError("bad_request", f"a malformed multipart body: {e}") from None
        for chunk in chunks:
            await spool.feed(chunk)
        chunks.clear()
        if not message.get("more_body", False):
            break
    if not state["done"]:
        raise ApiError("bad_request", "the multipart body has no complete file part")
    return filename[0]
