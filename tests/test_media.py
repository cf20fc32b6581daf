"""Media over real HTTP: uploads, downloads, ranges, thumbnails, access, attachments, limits and the
collector, each on both blob stores (a local folder and a real S3 server: versitygw) and on every
store the run names (PYCHAT_TEST_STORES)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from PIL import Image

from pychat.client import ChatClient, ChatError
from services.s3 import S3Server
from tests.conftest import Clients, ServerProcess, keyspace_dropper
from tests.test_contract import check_frame, check_rest

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["local", "s3"])
def blob_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _media_env(blob_kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """A server's environment for `blob_kind`: the default folder, or a bucket of its own on the
    session's S3 server."""
    if blob_kind == "local":
        return {}
    s3: S3Server = request.getfixturevalue("s3")
    return {"PYCHAT_MEDIA_STORE": s3.media_store(f"media-{uuid.uuid4().hex[:12]}"), **s3.client_env}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    store_env: dict[str, str],
    blob_kind: str,
    request: pytest.FixtureRequest,
) -> Iterator[ServerProcess]:
    drop = keyspace_dropper(request, store_env)
    srv = ServerProcess(tmp_path_factory.mktemp("media"), env={**store_env, **_media_env(blob_kind, request)})
    srv.start()
    yield srv
    srv.stop()
    drop(srv.env)


@pytest.fixture
def media_server(
    server_factory: Callable[..., ServerProcess], blob_kind: str, request: pytest.FixtureRequest
) -> Callable[..., ServerProcess]:
    """Servers of the test's own (fresh data dir, store and bucket), with extra settings."""

    def make(env: dict[str, str]) -> ServerProcess:
        return server_factory({**_media_env(blob_kind, request), **env})

    return make


def blob_keys(server: ServerProcess) -> set[str]:
    """The blobs the server's media store holds, read from the folder or the bucket itself."""
    store = server.env.get("PYCHAT_MEDIA_STORE", "")
    if not store:
        root = server.data_dir / "media"
        return {p.name for p in root.glob("*/*") if p.is_file() and not p.name.startswith(".")}
    client, bucket = _s3_client(server)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}
    finally:
        client.close()


def _s3_client(server: ServerProcess) -> tuple[object, str]:
    store = server.env["PYCHAT_MEDIA_STORE"]
    bucket, _, query = store[len("s3://") :].partition("?")
    endpoint = dict(kv.split("=", 1) for kv in query.split("&"))["endpoint"]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
    )
    return client, bucket


def delete_blob(server: ServerProcess, key: str) -> None:
    """Removes a blob behind the server's back (a lost file)."""
    if not server.env.get("PYCHAT_MEDIA_STORE"):
        (server.data_dir / "media" / key[:2] / key).unlink()
        return
    client, bucket = _s3_client(server)
    try:
        client.delete_object(Bucket=bucket, Key=key)
    finally:
        client.close()


def spooled(server: ServerProcess) -> list[Path]:
    return list((server.data_dir / "uploads").iterdir())


def image_bytes(fmt: str, size: tuple[int, int] = (1000, 500), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size, (30, 120, 200) if mode == "RGB" else 1)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident set now (`VmRSS`) or its peak since start or the last reset (`VmHWM`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def reset_peak_rss(pid: int) -> None:
    """Starts the process's `VmHWM` again from its RSS now (Linux 4.0+: proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def raw(client: ChatClient, method: str, path: str, **kwargs: object) -> httpx.Response:
    return await client.http.request(method, path, **kwargs)  # type: ignore[arg-type]


# -- uploads and downloads ---------------------------------------------------------------------


async def test_round_trip_keeps_every_byte(clients: Clients) -> None:
    alice = await clients.user("alice")
    data = os.urandom(3 * MiB + 17)
    media = await alice.upload(data, filename="notes.bin")
    assert media["size"] == len(data) and media["sha256"] == sha(data)
    assert media["url"] == f"/api/media/{media['media_id']}"
    assert media["content_type"] == "application/octet-stream"
    got = await alice.download(media["url"])
    assert got is not None and sha(got) == sha(data)


async def test_multipart_upload_takes_the_file_part(clients: Clients) -> None:
    alice = await clients.user("alice")
    data = image_bytes("PNG")
    r = await raw(
        alice,
        "POST",
        "/api/media",
        data={"caption": "ignored"},
        files={"file": ("cat photo.png", data, "application/octet-stream")},
    )
    assert r.status_code == 201, r.text
    media = r.json()
    assert media["sha256"] == sha(data) and media["content_type"] == "image/png"
    assert media["filename"] == "cat photo.png"
    assert await alice.download(media["media_id"]) == data


async def test_the_same_bytes_are_stored_once(clients: Clients, server: ServerProcess) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    data = os.urandom(200_000)
    before = blob_keys(server)
    first = await alice.upload(data)
    second = await bob.upload(data)
    assert first["media_id"] != second["media_id"] and first["sha256"] == second["sha256"]
    added = blob_keys(server) - before
    assert added == {sha(data)}, added
    assert await alice.download(first["media_id"]) == await bob.download(second["media_id"]) == data


async def test_the_same_bytes_uploaded_at_once_by_many(clients: Clients, server: ServerProcess) -> None:
    users = [await clients.user("twin") for _ in range(6)]
    data = os.urandom(2 * MiB)
    answers = await asyncio.gather(*[u.upload(data) for u in users])
    assert len({a["media_id"] for a in answers}) == 6 and {a["sha256"] for a in answers} == {sha(data)}
    assert sha(data) in blob_keys(server)
    for u, a in zip(users, answers, strict=True):
        assert await u.download(a["media_id"]) == data
    assert spooled(server) == []


async def test_the_type_is_read_from_the_bytes(clients: Clients) -> None:
    alice = await clients.user("alice")
    png = image_bytes("PNG")
    media = await alice.upload(png, content_type="text/html")
    assert media["content_type"] == "image/png"
    r = await raw(alice, "GET", media["url"])
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-disposition"].startswith("inline")

    page = b"<!doctype html><html><script>alert(document.cookie)</script></html>"
    media = await alice.upload(page, filename="evil.html", content_type="text/html")
    assert media["content_type"] == "text/plain; charset=utf-8"
    r = await raw(alice, "GET", media["url"])
    assert r.content == page
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["content-disposition"].startswith("attachment")
    assert 'filename="evil.html"' in r.headers["content-disposition"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in r.headers["content-security-policy"]

    pdf = b"%PDF-1.7\n" + os.urandom(1000)
    media = await alice.upload(pdf, content_type="image/png")
    assert media["content_type"] == "application/pdf" and "thumbnail_url" not in media
    r = await raw(alice, "GET", media["url"])
    assert r.headers["content-disposition"].startswith("attachment")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
async def test_images_get_dimensions_and_a_thumbnail(clients: Clients, fmt: str) -> None:
    alice = await clients.user("alice")
    data = image_bytes(fmt, (1200, 600))
    media = await alice.upload(data)
    assert media["content_type"] == f"image/{fmt.lower()}"
    assert (media["width"], media["height"]) == (1200, 600)
    r = await raw(alice, "GET", media["thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.format == "WEBP" and max(thumb.size) == 320 and thumb.size == (320, 160)


async def test_an_image_that_does_not_decode_is_kept_as_bytes(clients: Clients) -> None:
    alice = await clients.user("alice")
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)
    media = await alice.upload(data)
    assert media["content_type"] == "application/octet-stream" and "thumbnail_url" not in media
    r = await raw(alice, "GET", f"{media['url']}/thumbnail")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_a_decompression_bomb_is_refused_and_nothing_kept(
    clients: Clients, server: ServerProcess
) -> None:
    alice = await clients.user("alice")
    bomb = image_bytes("PNG", (12_000, 12_000), mode="1")  # 144 M pixels in ~20 KB
    assert len(bomb) < 100_000
    before = blob_keys(server)
    r = await raw(alice, "POST", "/api/media", content=bomb)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert blob_keys(server) == before and spooled(server) == []


async def test_every_range_case(clients: Clients) -> None:
    alice = await clients.user("alice")
    data = os.urandom(10_000)
    url = (await alice.upload(data))["url"]

    async def get(headers: dict[str, str]) -> httpx.Response:
        return await raw(alice, "GET", url, headers=headers)

    r = await get({"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == data[:10]
    assert r.headers["content-range"] == "bytes 0-9/10000" and r.headers["content-length"] == "10"
    r = await get({"Range": "bytes=9990-"})
    assert r.status_code == 206 and r.content == data[9990:]
    assert r.headers["content-range"] == "bytes 9990-9999/10000"
    r = await get({"Range": "bytes=-25"})
    assert r.status_code == 206 and r.content == data[-25:]
    r = await get({"Range": "bytes=5000-999999"})  # past the end: up to the end
    assert r.status_code == 206 and r.content == data[5000:]
    assert r.headers["content-range"] == "bytes 5000-9999/10000"
    r = await get({"Range": "bytes=-99999"})  # more than there is: all of it
    assert r.status_code == 206 and r.content == data
    for unsatisfiable in ("bytes=10000-", "bytes=20000-30000", "bytes=-0", "bytes=10-5"):
        r = await get({"Range": unsatisfiable})
        assert r.status_code == 416, unsatisfiable
        assert r.headers["content-range"] == "bytes */10000"
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=x-y"):
        r = await get({"Range": ignored})
        assert r.status_code == 200 and r.content == data, ignored
    etag = r.headers["etag"]
    r = await get({"Range": "bytes=0-3", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[:4]
    r = await get({"Range": "bytes=0-3", "If-Range": '"another"'})
    assert r.status_code == 200 and r.content == data


async def test_etag_and_if_none_match(clients: Clients) -> None:
    alice = await clients.user("alice")
    data = os.urandom(4096)
    url = (await alice.upload(data))["url"]
    r = await raw(alice, "GET", url)
    assert r.headers["etag"] == f'"{sha(data)}"'
    assert "private" in r.headers["cache-control"] and "immutable" in r.headers["cache-control"]
    etag = r.headers["etag"]
    r = await raw(alice, "GET", url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert "content-length" not in r.headers or r.headers["content-length"] == str(len(data))
    r = await raw(alice, "GET", url, headers={"If-None-Match": f'"other", W/{etag}'})
    assert r.status_code == 304
    r = await raw(alice, "GET", url, headers={"If-None-Match": '"stale", "other"'})
    assert r.status_code == 200 and r.content == data


async def test_bad_uploads_get_clear_errors(clients: Clients, server: ServerProcess) -> None:
    alice = await clients.user("alice")
    r = await raw(alice, "POST", "/api/media", content=b"")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = await raw(
        alice, "POST", "/api/media", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}
    )
    assert r.status_code == 400
    r = await raw(
        alice,
        "POST",
        "/api/media",
        content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400 and "file part" in r.json()["error"]["message"]
    r = await raw(
        alice,
        "POST",
        "/api/media",
        content=b"--" + b"b" * 300 + b"\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=" + "b" * 300},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        r = await anonymous.post("/api/media", content=b"data")
        assert r.status_code == 401
        r = await anonymous.get("/api/media/whatever")
        assert r.status_code == 401
    assert spooled(server) == []


async def test_an_upload_over_the_limit_gets_413_and_leaves_nothing(
    clients: Clients, server: ServerProcess
) -> None:
    alice = await clients.user("alice")
    before = blob_keys(server)
    chunk = os.urandom(MiB)

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: the server has to count
        for _ in range(101):
            yield chunk

    r = await raw(alice, "POST", "/api/media", content=body(), timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = await raw(
        alice, "POST", "/api/media", content=b"x" * (101 * MiB), timeout=120
    )  # declared: refused before it is read
    assert r.status_code == 413
    # Only the limit's worth of it is read and dropped: the connection is not kept for another
    # request (which would find it closed under it).
    assert r.headers.get("connection") == "close"
    assert blob_keys(server) == before
    assert spooled(server) == []
    # The server goes on serving.
    assert (await alice.upload(b"small"))["size"] == 5


async def test_a_lost_blob_is_an_error_not_a_truncated_file(clients: Clients, server: ServerProcess) -> None:
    alice = await clients.user("alice")
    data = os.urandom(30_000)
    media = await alice.upload(data)
    delete_blob(server, sha(data))
    r = await raw(alice, "GET", media["url"])
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    # The same bytes uploaded again bring the blob back for both uploads.
    await alice.upload(data)
    assert await alice.download(media["url"]) == data


# -- access ------------------------------------------------------------------------------------


async def test_access_follows_chat_membership(clients: Clients) -> None:
    owner = await clients.user("owner")
    member = await clients.user("member")
    outsider = await clients.user("outsider")
    leaver = await clients.user("leaver")
    data = image_bytes("PNG")
    media = await owner.upload(data)

    async def status(client: ChatClient, url: str) -> int:
        return (await raw(client, "GET", url)).status_code

    assert await status(owner, media["url"]) == 200
    for c in (member, outsider, leaver):
        assert await status(c, media["url"]) == 403
        assert await status(c, media["thumbnail_url"]) == 403
    assert await status(owner, "/api/media/md-unknown") == 404

    group = await owner.create_group("pics", [member.user_id, leaver.user_id])
    # Someone else's upload cannot be posted by a member who was never shown it.
    with pytest.raises(ChatError) as refused:
        await member.post_message(group["chat_id"], "mine now", attachments=[media["media_id"]])
    assert refused.value.code == "forbidden"
    await owner.post_message(group["chat_id"], "look", attachments=[media["media_id"]])
    for c in (member, leaver):
        assert await status(c, media["url"]) == 200
        assert await status(c, media["thumbnail_url"]) == 200
    assert await status(outsider, media["url"]) == 403

    await owner.request("DELETE", f"/api/chats/{group['chat_id']}/members/{leaver.user_id}")
    assert await status(leaver, media["url"]) == 403
    assert await status(member, media["url"]) == 200

    # A member who may see it may forward it: the other chat's members see it then.
    direct = await member.create_direct(outsider.user_id)
    await member.post_message(direct["chat_id"], "fwd", attachments=[media["media_id"]])
    assert await status(outsider, media["url"]) == 200


# -- attachments in messages -------------------------------------------------------------------


async def test_attachments_in_send_msg_history_and_sync(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    photo = await alice.upload(image_bytes("JPEG"), filename="beach.jpg")
    doc = await alice.upload(b"%PDF-1.4\n" + os.urandom(100), filename="plan.pdf")
    await alice.connect()
    await bob.connect()
    await bob.sync()
    ack = await alice.send(chat["chat_id"], "two files", attachments=[photo["media_id"], doc["media_id"]])
    msg = await bob.next_event("msg")
    assert msg["seq"] == ack["seq"]
    check_frame(msg)
    check_rest("Media", photo)
    expected = [
        {
            k: photo[k]
            for k in ("media_id", "content_type", "size", "url", "thumbnail_url", "width", "height")
        },
        {k: doc[k] for k in ("media_id", "content_type", "size", "url")},
    ]
    for got, want in zip(msg["attachments"], expected, strict=True):
        assert {k: got[k] for k in want} == want
    assert "thumbnail_url" not in msg["attachments"][1]
    assert msg["attachments"][0]["filename"] == "beach.jpg"

    history = await bob.history(chat["chat_id"])
    assert history["messages"][-1]["attachments"] == msg["attachments"]
    check_rest("Message", history["messages"][-1])
    late = await clients.device(bob)
    await late.connect()
    backlog = await late.sync({chat["chat_id"]: 0})
    assert backlog["chats"][chat["chat_id"]] == ack["seq"]
    synced = [e for e in late.pending_events() if e.get("type") == "msg"]
    assert synced[-1]["attachments"] == msg["attachments"]
    assert await bob.download(msg["attachments"][0]["thumbnail_url"])

    # A retry of the same send is the same message: the attachments are not added twice.
    again = await alice.post_message(
        chat["chat_id"], "two files", client_msg_id=ack["client_msg_id"], attachments=[photo["media_id"]]
    )
    assert again["seq"] == ack["seq"]


async def test_bad_attachments_are_refused_and_nothing_stored(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    media = await alice.upload(b"hello")
    for attachments, code in (
        (["md-unknown"], "not_found"),
        ([media["media_id"]] * 1 + [f"x{i}" for i in range(10)], "too_large"),
    ):
        with pytest.raises(ChatError) as refused:
            await alice.post_message(chat["chat_id"], "bad", attachments=attachments)
        assert refused.value.code == code
    await alice.connect()
    with pytest.raises(ChatError) as refused:
        await alice.send(chat["chat_id"], "bad", attachments=["md-unknown"])
    assert refused.value.code == "not_found"
    assert (await alice.history(chat["chat_id"]))["messages"] == []
    ok = await alice.send(chat["chat_id"], "", attachments=[media["media_id"]])
    assert ok["seq"] == 1


# -- lifecycle ---------------------------------------------------------------------------------


async def test_the_collector_removes_unattached_uploads_and_unused_blobs(
    media_server: Callable[..., ServerProcess],
) -> None:
    srv = media_server({"PYCHAT_MEDIA_UNATTACHED_AGE_S": "2", "PYCHAT_MEDIA_GC_INTERVAL_S": "1"})
    made = Clients(srv)
    try:
        alice = await made.user("alice")
        bob = await made.user("bob")
        chat = await alice.create_direct(bob.user_id)
        lonely = os.urandom(50_000)
        shared = os.urandom(60_000)
        kept_image = image_bytes("PNG", (640, 640))
        gone = await alice.upload(lonely)
        gone_twin = await bob.upload(shared)  # never attached, but its bytes are
        posted_twin = await alice.upload(shared)
        posted_image = await alice.upload(kept_image)
        await alice.post_message(
            chat["chat_id"], "keep", attachments=[posted_twin["media_id"], posted_image["media_id"]]
        )
        assert {sha(lonely), sha(shared), sha(kept_image)} <= blob_keys(srv)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # gone_twin, uploaded after gone, may pass the age a collector run after it.
            statuses = [
                (await raw(c, "GET", m["url"])).status_code for c, m in ((alice, gone), (bob, gone_twin))
            ]
            if statuses == [404, 404] and sha(lonely) not in blob_keys(srv):
                break
            await asyncio.sleep(0.3)
        assert (await raw(alice, "GET", gone["url"])).status_code == 404
        assert (await raw(bob, "GET", gone_twin["url"])).status_code == 404
        keys = blob_keys(srv)
        assert sha(lonely) not in keys
        assert sha(shared) in keys and sha(kept_image) in keys  # still pointed to
        assert len([k for k in keys if k.startswith("trash-")]) == 0
        assert await bob.download(posted_twin["media_id"]) == shared
        assert await bob.download(posted_image["thumbnail_url"])
        # Collected media cannot be attached any more.
        with pytest.raises(ChatError) as refused:
            await alice.post_message(chat["chat_id"], "late", attachments=[gone["media_id"]])
        assert refused.value.code == "not_found"
        # The same bytes uploaded again are stored again.
        again = await alice.upload(lonely)
        assert await alice.download(again["media_id"]) == lonely
    finally:
        await made.close()


async def test_the_daily_quota_answers_rate_limited(media_server: Callable[..., ServerProcess]) -> None:
    srv = media_server({"PYCHAT_MEDIA_QUOTA_BYTES_PER_DAY": "100000"})
    made = Clients(srv)
    try:
        alice = await made.user("alice")
        bob = await made.user("bob")
        await alice.upload(os.urandom(60_000))
        for attempt in (os.urandom(60_000), None):
            if attempt is None:  # no Content-Length: counted once it has arrived

                async def body() -> AsyncIterator[bytes]:
                    yield os.urandom(60_000)

                r = await raw(alice, "POST", "/api/media", content=body())
            else:
                r = await raw(alice, "POST", "/api/media", content=attempt)
            assert r.status_code == 429
            error = r.json()["error"]
            assert error["code"] == "rate_limited" and error["retry_after_ms"] > 80_000_000
            assert int(r.headers["retry-after"]) > 80_000
        await alice.upload(os.urandom(30_000))  # within what is left
        await bob.upload(os.urandom(90_000))  # a quota per user
        assert spooled(srv) == []
    finally:
        await made.close()


async def test_the_quota_holds_under_30_parallel_uploads(media_server: Callable[..., ServerProcess]) -> None:
    """30 uploads of 1 MB at once against a 10 MB quota: at most 10 are kept (each one's bytes are
    reserved before it is kept; 23 passed the same check before), also without Content-Length."""
    srv = media_server({"PYCHAT_MEDIA_QUOTA_BYTES_PER_DAY": str(10 * 1_000_000)})
    made = Clients(srv)
    try:
        alice = await made.user("alice")

        async def upload(i: int) -> httpx.Response:
            data = os.urandom(1_000_000)
            if i % 3:
                return await raw(alice, "POST", "/api/media", content=data)

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
                yield data[:500_000]
                yield data[500_000:]

            return await raw(alice, "POST", "/api/media", content=chunks())

        answers = await asyncio.gather(*(upload(i) for i in range(30)))
        kept = [r for r in answers if r.status_code == 201]
        refused = [r for r in answers if r.status_code != 201]
        assert 1 <= len(kept) <= 10, [r.status_code for r in answers]
        assert {(r.status_code, r.json()["error"]["code"]) for r in refused} == {(429, "rate_limited")}
        assert sum(r.json()["size"] for r in kept) <= 10 * 1_000_000
        assert spooled(srv) == []
    finally:
        await made.close()


@pytest.mark.timeout(300)
async def test_a_100_mib_upload_and_download_leave_the_server_rss_nearly_flat(
    media_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # A server of its own: its peak RSS is this test's alone.
    srv = media_server({})
    assert srv.proc is not None
    made = Clients(srv)
    try:
        alice = await made.user("alice")
        source = tmp_path / "big.bin"
        expected = await asyncio.to_thread(write_random_file, source, 100 * MiB)
        # Warm up the paths (threads, pools, imports) with a small file first.
        small = await alice.upload(os.urandom(2 * MiB))
        await alice.download(small["media_id"], to=tmp_path / "small.out")
        before = rss_kib(srv.proc.pid)
        # The peak, not RSS after: a server that held the whole file and freed it at the end
        # would be back where it started by then.
        reset_peak_rss(srv.proc.pid)
        assert rss_kib(srv.proc.pid, "VmHWM") < before + 4 * 1024, "the peak starts again from here"
        media = await alice.upload(source)
        target = tmp_path / "big.out"
        await alice.download(media["media_id"], to=target)
        peak = rss_kib(srv.proc.pid, "VmHWM")
        assert media["sha256"] == expected
        assert await asyncio.to_thread(file_sha, target) == expected
        print(f"server RSS {before / 1024:.1f} MiB, peak during the transfers {peak / 1024:.1f} MiB")
        # The bytes pass through a few MiB at a time (spool and read chunks, one S3 part).
        assert peak - before < 16 * 1024, f"the peak RSS was {(peak - before) / 1024:.1f} MiB above"
    finally:
        await made.close()
