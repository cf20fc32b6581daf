"""Media (issue 14) measured on this machine: the server, the S3 server and the clients share its
two cores and its disk.

- transfer: upload and download MB/s of one 100 MiB file and of 32 files of 1 MiB, through a real
  server (REST; the SDK streams the file from disk and the download to disk), with media in the
  local folder and in S3 (versitygw), against a plain copy of the same bytes on the same disk
  (read, write, fsync: the least an upload costs) in the same run. Medians of `--repeats`.
- chat under uploads: `--rate` msg/s over WebSocket between 10 pairs (send -> ack and send ->
  delivery at the partner), alone, then while 50 clients in another process upload
  `--upload-mib` MiB files back to back, on the same server in the same run.

    .venv/bin/python benchmarks/media_bench.py [--quick]

Starts its own servers (and S3 server) and stops them. Writes benchmarks/results/media-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, one, record, server_code  # noqa: E402
from pychat.client import ChatClient  # noqa: E402
from services.process import free_port  # noqa: E402
from services.s3 import S3Server  # noqa: E402
from tests.conftest import PASSWORD, ServerProcess  # noqa: E402

MiB = 1024 * 1024
SERVERS: list[Code] = []


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


def freshen(path: Path) -> None:
    """New bytes at the front of the file: an upload of it is new content (no dedup)."""
    with open(path, "r+b") as f:
        f.write(os.urandom(16))


def plain_copy(src: Path, dst: Path) -> float:
    """Seconds to copy `src` to `dst` and make it durable (what the server does with an upload,
    without HTTP, hashing or a database row)."""
    started = time.perf_counter()
    with open(src, "rb") as s, open(dst, "wb") as d:
        shutil.copyfileobj(s, d, 1024 * 1024)
        d.flush()
        os.fsync(d.fileno())
    took = time.perf_counter() - started
    dst.unlink()
    return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def new_user(url: str, name: str) -> ChatClient:
    await ChatClient.register(url, name, PASSWORD)
    return await ChatClient.login(url, name, PASSWORD)


async def transfer(srv: ServerProcess, files: dict[str, list[Path]], repeats: int) -> dict[str, Any]:
    client = await new_user(srv.url, f"bench{os.getpid()}")
    out: dict[str, Any] = {}
    try:
        for label, paths in files.items():
            total = sum(p.stat().st_size for p in paths)
            ups, downs = [], []
            for r in range(repeats):
                # Fresh bytes each round (the same bytes would be stored once and not written again).
                for p in paths:
                    await asyncio.to_thread(freshen, p)
                t0 = time.perf_counter()
                ids = [(await client.upload(p))["media_id"] for p in paths]
                ups.append(time.perf_counter() - t0)
                target = srv.data_dir / f"download-{r}"
                t0 = time.perf_counter()
                for media_id in ids:
                    await client.download(media_id, to=target)
                downs.append(time.perf_counter() - t0)
                target.unlink()
            out[label] = {
                "bytes": total,
                "files": len(paths),
                "upload_s": [round(x, 4) for x in ups],
                "download_s": [round(x, 4) for x in downs],
                "upload_mb_s": round(total / MiB / statistics.median(ups), 1),
                "download_mb_s": round(total / MiB / statistics.median(downs), 1),
            }
    finally:
        await client.close()
    return out


async def chat_latency(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """10 pairs; each sender sends rate/10 msg/s (open loop); ack and delivery latency in ms."""
    pairs = []
    for i in range(10):
        a = await new_user(url, f"ca{os.getpid()}_{i}_{time.monotonic_ns()}")
        b = await new_user(url, f"cb{os.getpid()}_{i}_{time.monotonic_ns()}")
        chat = await a.create_direct(b.user_id)
        await a.connect()
        await b.connect()
        await b.sync()
        pairs.append((a, b, chat["chat_id"]))
    acks: list[float] = []
    deliveries: list[float] = []
    sent = 0
    errors = 0

    async def receive(b: ChatClient, until: float) -> None:
        while time.monotonic() < until + 5:
            try:
                frame = await b.next_event("msg", timeout=max(0.1, until + 5 - time.monotonic()))
            except TimeoutError:
                return
            deliveries.append((time.time() - float(frame["content"])) * 1000)

    async def send(a: ChatClient, chat_id: str, until: float) -> None:
        nonlocal sent, errors
        interval = 10 / rate
        next_at = time.monotonic()
        pending = []
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            fut = a.send_nowait(chat_id, repr(time.time()))
            sent += 1

            def done(f: asyncio.Future[dict[str, Any]], started: float = started) -> None:
                nonlocal errors
                if f.exception() is None:
                    acks.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

            fut.add_done_callback(done)
            pending.append(fut)
            next_at += interval
        await asyncio.gather(*pending, return_exceptions=True)

    until = time.monotonic() + seconds
    await asyncio.gather(*[send(a, c, until) for a, _, c in pairs], *[receive(b, until) for _, b, _ in pairs])
    for a, b, _ in pairs:
        await a.close()
        await b.close()
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": sent,
        "acked": len(acks),
        "delivered": len(deliveries),
        "errors": errors,
        "ack_ms": {"p50": round(percentile(acks, 0.5), 2), "p99": round(percentile(acks, 0.99), 2)},
        "delivery_ms": {
            "p50": round(percentile(deliveries, 0.5), 2),
            "p99": round(percentile(deliveries, 0.99), 2),
        },
    }


async def uploaders(url: str, count: int, size_mib: int, directory: Path, stop_file: Path) -> None:
    """(In its own process.) `count` clients upload files of their own back to back until `stop_file`
    exists; prints a JSON line of what went up."""
    clients = [await new_user(url, f"up{os.getpid()}_{i}") for i in range(count)]
    files = [random_file(directory / f"up-{i}.bin", size_mib * MiB) for i in range(count)]
    done = [0] * count
    failed = [0] * count
    await asyncio.to_thread(Path(str(stop_file) + ".ready").touch)
    started = time.perf_counter()

    async def loop(i: int) -> None:
        while not await asyncio.to_thread(stop_file.exists):
            await asyncio.to_thread(freshen, files[i])
            try:
                await clients[i].upload(files[i])
                done[i] += 1
            except Exception:
                failed[i] += 1

    await asyncio.gather(*[loop(i) for i in range(count)])
    took = time.perf_counter() - started
    for c in clients:
        await c.close()
    uploaded = sum(done) * size_mib
    print(
        json.dumps(
            {"uploads": sum(done), "failed": sum(failed), "mib": uploaded, "mb_s": round(uploaded / took, 1)}
        )
    )


async def under_uploads(srv: ServerProcess, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    alone = await chat_latency(srv.url, args.rate, args.seconds)
    stop = work / "stop"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--uploaders",
        srv.url,
        "--upload-mib",
        str(args.upload_mib),
        "--work",
        str(work),
        stdout=asyncio.subprocess.PIPE,
    )
    while not await asyncio.to_thread(Path(str(stop) + ".ready").exists):
        if proc.returncode is not None:
            raise RuntimeError("the uploaders stopped")
        await asyncio.sleep(0.2)
    await asyncio.sleep(2)  # all 50 uploads under way
    during = await chat_latency(srv.url, args.rate, args.seconds)
    await asyncio.to_thread(stop.touch)
    out, _ = await proc.communicate()
    return {
        "uploaders": 50,
        "upload_mib_each": args.upload_mib,
        "alone": alone,
        "during_uploads": during,
        "uploads": json.loads(out.decode().strip().splitlines()[-1]),
        "ack_p99_ratio": round(during["ack_ms"]["p99"] / alone["ack_ms"]["p99"], 2),
        "delivery_p99_ratio": round(during["delivery_ms"]["p99"] / alone["delivery_ms"]["p99"], 2),
    }


def start_server(work: Path, name: str, env: dict[str, str]) -> ServerProcess:
    d = work / name
    d.mkdir()
    # A quota that the benchmark's own volume does not reach.
    srv = ServerProcess(d, env={"PYCHAT_MEDIA_QUOTA_BYTES_PER_DAY": "0", **env})
    srv.start()
    assert srv.proc is not None
    SERVERS.append(server_code(srv.proc.pid))
    return srv


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"settings": vars(args) | {"work": None}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        big = [random_file(work / "big.bin", args.big_mib * MiB)]
        small = [random_file(work / f"small-{i}.bin", MiB) for i in range(args.small_count)]
        copies = [plain_copy(big[0], work / "copy.bin") for _ in range(args.repeats)]
        small_copies = []
        for _ in range(args.repeats):
            small_copies.append(sum(plain_copy(p, work / "copy.bin") for p in small))
        results["plain_copy"] = {
            "big_mb_s": round(args.big_mib / statistics.median(copies), 1),
            "small_mb_s": round(args.small_count / statistics.median(small_copies), 1),
            "big_s": [round(x, 4) for x in copies],
            "small_s": [round(x, 4) for x in small_copies],
        }
        s3 = S3Server(work / "s3-server", port=free_port(), exit_with_parent=True)
        s3.start()
        try:
            for kind, env in (
                ("local", {}),
                ("s3", {"PYCHAT_MEDIA_STORE": s3.media_store("bench"), **s3.client_env}),
            ):
                srv = start_server(work, kind, env)
                try:
                    got = await transfer(srv, {"big": big, "small": small}, args.repeats)
                finally:
                    srv.stop()
                for label in ("big", "small"):
                    floor = results["plain_copy"][f"{label}_mb_s"]
                    got[label]["upload_vs_copy"] = round(got[label]["upload_mb_s"] / floor, 2)
                    got[label]["download_vs_copy"] = round(got[label]["download_mb_s"] / floor, 2)
                results[f"transfer_{kind}"] = got
            srv = start_server(work, "chat", {})
            try:
                results["chat_under_uploads"] = await under_uploads(srv, args, work)
            finally:
                srv.stop()
        finally:
            s3.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short phases (a smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--big-mib", type=int, default=100)
    p.add_argument("--small-count", type=int, default=32)
    p.add_argument("--rate", type=float, default=200.0, help="chat messages per second in all")
    p.add_argument("--seconds", type=float, default=15.0, help="each chat phase")
    p.add_argument("--upload-mib", type=int, default=10, help="size of each of the 50 uploaders' files")
    p.add_argument(
        "--work", type=Path, default=None, help="where the files go (default: the system temporary folder)"
    )
    p.add_argument("--uploaders", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.uploaders:
        # The uploaders stand in for clients on other machines: they get the CPU the server and
        # the chat clients leave (on this 2-core box they would otherwise take half of it).
        os.nice(10)
        asyncio.run(uploaders(args.uploaders, 50, args.upload_mib, args.work, args.work / "stop"))
        return
    if args.quick:
        args.repeats, args.big_mib, args.small_count, args.seconds, args.upload_mib = 1, 20, 8, 4.0, 2
    results = asyncio.run(run(args))
    record("media", results, one(SERVERS))


if __name__ == "__main__":
    main()
