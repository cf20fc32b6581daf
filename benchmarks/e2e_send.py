"""First end-to-end figure: acked (durable) messages per second into the SQLite
store, and ack latency, against a real `pychat serve` subprocess.

Baseline in the same run: the same SQLite settings committing one message per
transaction (what a server without group commit does), measured in-process.

    .venv/bin/python benchmarks/e2e_send.py [--seconds 10] [--procs 2] [--conns 16] [--window 64]

Writes benchmarks/results/e2e_send-<time>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import record, server_code  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


def setup_chats(url: str, n: int) -> list[tuple[str, str]]:
    """n (token, chat_id) pairs: each sender has its own direct chat with an offline partner."""
    out = []
    with httpx.Client(base_url=url, timeout=30) as http:
        tag = uuid.uuid4().hex[:6]
        for i in range(n):
            users = []
            for role in ("s", "r"):
                name = f"b{tag}{role}{i}"
                http.post("/api/users", json={"username": name, "password": "benchmark1"}).raise_for_status()
                tok = http.post("/api/auth/token", json={"username": name, "password": "benchmark1"}).json()
                users.append(tok)
            chat = http.post(
                "/api/chats",
                json={"kind": "direct", "members": [users[1]["user_id"]]},
                headers={"Authorization": f"Bearer {users[0]['token']}"},
            ).json()
            out.append((users[0]["token"], chat["chat_id"]))
    return out


async def _pipelined(
    ws_url: str, token: str, chat_id: str, window: int, stop_at: float, lat: list[float]
) -> int:
    acked = 0
    errors = 0
    async with connect(f"{ws_url}?token={token}", max_size=2**22) as ws:
        await ws.recv()  # hello
        sent_at: dict[str, float] = {}
        room = asyncio.Event()  # set while fewer than `window` sends are unacked
        room.set()

        async def sender() -> None:
            i = 0
            while time.monotonic() < stop_at:
                if len(sent_at) >= window:
                    room.clear()
                    await room.wait()
                cmid = f"{i}"
                i += 1
                sent_at[cmid] = time.perf_counter()
                await ws.send(
                    json.dumps(
                        {"type": "send", "chat_id": chat_id, "client_msg_id": cmid, "content": "x" * 64}
                    )
                )

        task = asyncio.create_task(sender())
        while not (task.done() and not sent_at):
            try:
                raw = await asyncio.wait_for(ws.recv(), 5)
            except TimeoutError:
                break
            frame = json.loads(raw)
            if frame["type"] == "error":  # never expected here; free the slot so the run ends
                sent_at.pop(frame.get("ref") or "", None)
                room.set()
                errors += 1
            if frame["type"] == "ack":
                t0 = sent_at.pop(frame["client_msg_id"], None)
                room.set()
                if t0 is not None:
                    acked += 1
                    if acked % 16 == 0:
                        lat.append(time.perf_counter() - t0)
        await task
    if errors:
        print(f"{errors} sends were refused; the figure is not valid", file=sys.stderr)
    return acked


def _worker(ws_url: str, pairs: list[tuple[str, str]], window: int, stop_at_wall: float, out: Any) -> None:
    async def run() -> tuple[int, list[float]]:
        stop_at = time.monotonic() + (stop_at_wall - time.time())
        lat: list[float] = []
        counts = await asyncio.gather(*(_pipelined(ws_url, t, c, window, stop_at, lat) for t, c in pairs))
        return sum(counts), lat

    out.put(asyncio.run(run()))


async def sequential_latency(ws_url: str, token: str, chat_id: str, n: int) -> list[float]:
    lat = []
    async with connect(f"{ws_url}?token={token}") as ws:
        await ws.recv()
        for i in range(n):
            t0 = time.perf_counter()
            await ws.send(
                json.dumps(
                    {"type": "send", "chat_id": chat_id, "client_msg_id": f"seq{i}", "content": "x" * 64}
                )
            )
            while json.loads(await ws.recv())["type"] != "ack":
                pass
            lat.append(time.perf_counter() - t0)
    return lat


def baseline_one_txn_per_message(seconds: float, synchronous: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(Path(d) / "b.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE m (chat_id TEXT, seq INTEGER, body TEXT, PRIMARY KEY (chat_id, seq))")
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO m VALUES ('c', ?, ?)", (n, "x" * 64))
            db.execute("COMMIT")
            n += 1
        db.close()
    return n / seconds


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("pychat_engine_batch_events_sum") or line.startswith(
            "pychat_engine_batch_events_count"
        ):
            name, v = line.split(" ")
            values[name.split("{")[0]] = float(v)
    count = values.get("pychat_engine_batch_events_count", 0.0)
    return count, (values.get("pychat_engine_batch_events_sum", 0.0) / count if count else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--conns", type=int, default=16, help="connections per process")
    ap.add_argument("--window", type=int, default=64, help="unacked sends per connection")
    ap.add_argument("--synchronous", default="FULL")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        # Per-connection send limits off: this measures the engine, not the abuse guard.
        env = {
            "PYCHAT_SQLITE_SYNCHRONOUS": args.synchronous,
            "PYCHAT_LOG_LEVEL": "warning",
            "PYCHAT_SEND_PER_S": "10000000",
            "PYCHAT_SEND_BURST": "10000000",
            # Every sender and receiver registers over REST from this one address.
            "PYCHAT_REGISTER_PER_MIN": "1000000",
        }
        srv = ServerProcess(Path(d), env=env)
        srv.start()
        assert srv.proc is not None
        measured = server_code(srv.proc.pid)
        try:
            pairs = setup_chats(srv.url, args.procs * args.conns + 1)
            lat_seq = asyncio.run(sequential_latency(srv.ws_url, pairs[-1][0], pairs[-1][1], 500))
            server_cpu0 = _cpu_seconds(srv.proc.pid)  # type: ignore[union-attr]
            q: Any = mp.Queue()
            stop_at = time.time() + 1.0 + args.seconds
            procs = [
                mp.Process(
                    target=_worker,
                    args=(srv.ws_url, pairs[i * args.conns : (i + 1) * args.conns], args.window, stop_at, q),
                )
                for i in range(args.procs)
            ]
            for p in procs:
                p.start()
            results = [q.get() for _ in procs]
            for p in procs:
                p.join()
            server_cpu = _cpu_seconds(srv.proc.pid) - server_cpu0  # type: ignore[union-attr]
            batches, mean_batch = batch_stats(srv.url)
        finally:
            srv.stop()
    acked = sum(r[0] for r in results)
    lat_load = sorted(x for r in results for x in r[1])
    rate = acked / args.seconds
    base = baseline_one_txn_per_message(3, args.synchronous)
    out = {
        "args": vars(args),
        "acked_messages": acked,
        "acked_per_second": round(rate),
        "ack_latency_ms_sequential": {
            "p50": _ms(statistics.median(lat_seq)),
            "p99": _ms(_pct(sorted(lat_seq), 0.99)),
        },
        "ack_latency_ms_under_load": {"p50": _ms(_pct(lat_load, 0.5)), "p99": _ms(_pct(lat_load, 0.99))},
        "engine_batches": batches,
        "mean_batch_events": round(mean_batch, 1),
        "server_cpu_seconds": round(server_cpu, 2),
        "baseline_one_txn_per_message_per_second": round(base),
        "ratio_vs_baseline": round(rate / base, 1) if base else None,
    }
    record("e2e_send", out, measured)


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _ms(x: float) -> float:
    return round(x * 1000, 3)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
