"""The pure parts of media: typing from the first bytes, Range parsing, file names in headers."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pychat.media import ByteRange, _filename, disposition, parse_range, sniff
from pychat.store import Media


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n rest", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a...", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"%PDF-1.7", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1f\x8b\x08", "application/gzip"),
        (b"\x00\x00\x00\x18ftypisom", "video/mp4"),
        (b"\x00\x00\x00\x18ftypheic", "image/heic"),
        (b"\x00\x00\x00\x18ftypavif", "image/avif"),
        (b"\x00\x00\x00\x14ftypqt  ", "video/quicktime"),
        (b"\x00\x00\x00\x20ftypM4A ", "audio/mp4"),
        (b"\x1a\x45\xdf\xa3", "video/webm"),
        (b"OggS\x00", "audio/ogg"),
        (b"ID3\x04", "audio/mpeg"),
        (b"<html><script>x</script></html>", "text/plain; charset=utf-8"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "text/plain; charset=utf-8"),
        ("naïve café ".encode() * 400 + "é".encode()[:1], "text/plain; charset=utf-8"),  # cut mid-character
        (b"\x00\x01\x02binary", "application/octet-stream"),
        (b"\xff\xfe\xfd\xfc", "application/octet-stream"),
    ],
)
def test_the_type_comes_from_the_first_bytes(head: bytes, kind: str) -> None:
    assert sniff(head) == kind


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-0", 100, ByteRange(0, 1)),
        ("bytes=0-99", 100, ByteRange(0, 100)),
        ("bytes=0-1000", 100, ByteRange(0, 100)),
        ("bytes=99-", 100, ByteRange(99, 1)),
        ("bytes=-1", 100, ByteRange(99, 1)),
        ("bytes=-1000", 100, ByteRange(0, 100)),
        (" bytes = 5 - 9 ", 100, ByteRange(5, 5)),
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=9-5", 100, "unsatisfiable"),
        ("bytes=0-", 0, "unsatisfiable"),
        ("bytes=-", 100, None),
        ("bytes=0-1,3-4", 100, None),
        ("pages=1-2", 100, None),
        ("bytes=a-b", 100, None),
    ],
)
def test_range_headers(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


def test_file_names_are_names_and_quoted_safely() -> None:
    assert _filename("../../etc/passwd") == "passwd"
    assert _filename("C:\\Users\\me\\photo.jpg") == "photo.jpg"
    assert _filename("a\r\nSet-Cookie: x=1.txt") == "aSet-Cookie: x=1.txt"
    assert _filename("   ") is None and _filename(None) is None
    media = Media("md1", "u", "ab" * 32, "application/pdf", 1, 1, 'rés"umé\\.pdf')
    header = disposition(media, inline=False)
    assert header == "attachment; filename=\"r_s_um__.pdf\"; filename*=UTF-8''r%C3%A9s%22um%C3%A9%5C.pdf"
    assert disposition(Media("md2", "u", "cd" * 32, "image/png", 1, 1), inline=True) == "inline"


def test_a_rotated_photo_gets_an_upright_thumbnail(tmp_path: object) -> None:
    from pathlib import Path

    from pychat.media import inspect_image

    directory = Path(str(tmp_path))
    img = Image.new("RGB", (1200, 600), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    photo = directory / "photo.jpg"
    photo.write_bytes(buf.getvalue())
    info = inspect_image(photo, "image/jpeg", 50_000_000, 320, directory / "thumb.webp")
    assert info is not None and (info.width, info.height) == (1200, 600)
    with Image.open(directory / "thumb.webp") as thumb:
        assert thumb.size == (160, 320)
