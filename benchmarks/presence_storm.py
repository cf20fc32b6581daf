"""Presence storm: N users, each with F direct-chat partners (followers), all
connect; then half of them (every other user) disconnect while the rest stay
online; then the rest disconnect. Records the server's CPU-seconds and the
presence frames it sent per phase, so the cost per user can be compared
across N and F.

Baseline in the same run: the same N with F = 0 (connections without
followers): what is left above it is the cost of presence itself.

    .venv/bin/python benchmarks/presence_storm.py                 # N in 2,500 and 10,000; F in 0, 5, 20
    .venv/bin/python benchmarks/presence_storm.py --quick         # N = 1,000 only

Writes benchmarks/results/presence_storm-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, one, record, server_code  # noqa: E402
from pychat import _core  # noqa: E402
from pychat.auth import hash_password  # noqa: E402
from pychat.store.sqlite import SqliteStore  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

GRACE_MS = 1000

# The code each scenario's server ran.
SERVERS: list[Code] = []


def prepare(data_dir: Path, n: int, followers: int) -> list[str]:
    """Users u0..u{n-1}; user i shares a direct chat with i+1..i+F/2 (mod n): F partners each."""
    SqliteStore(data_dir / "pychat.db").close()  # creates the schema
    db = sqlite3.connect(data_dir / "pychat.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    pw = hash_password("benchmark1")
    now = int(time.time() * 1000)
    ids = [f"u{i:06d}" for i in range(n)]
    db.executemany(
        "INSERT INTO users (user_id, username, username_key, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        [(u, u, u, pw, now) for u in ids],
    )
    chats, members = [], []
    for i in range(n):
        for k in range(1, followers // 2 + 1):
            a, b = ids[i], ids[(i + k) % n]
            chat_id = f"c{i:06d}x{k:03d}"
            chats.append((chat_id, "direct", a, now, now, "|".join(sorted((a, b)))))
            members += [(a, chat_id, now), (b, chat_id, now)]
    db.executemany(
        "INSERT INTO chats (chat_id, kind, created_by, created_at, last_activity, direct_key) VALUES (?, ?, ?, ?, ?, ?)",
        chats,
    )
    db.executemany("INSERT INTO user_chats (user_id, chat_id, joined_at) VALUES (?, ?, ?)", members)
    db.execute("COMMIT")
    db.close()
    return ids


def _client(
    ws_url: str,
    users: list[tuple[int, str]],
    source_ip: str,
    connected: Any,
    churn: Any,
    go_away: Any,
    out: Any,
) -> None:
    async def run() -> tuple[int, int]:
        frames = 0
        sem = asyncio.Semaphore(100)
        conns: list[tuple[int, Any]] = []

        async def open_one(index: int, tok: str) -> None:
            async with sem:
                ws = await connect(f"{ws_url}?token={tok}", local_addr=(source_ip, 0), ping_interval=None)
                conns.append((index, ws))

        await asyncio.gather(*(open_one(i, t) for i, t in users))
        connected.set()

        async def drain(ws: Any) -> None:
            nonlocal frames
            try:
                async for raw in ws:
                    if '"presence"' in raw:
                        frames += 1
            except Exception:
                pass

        readers = [asyncio.create_task(drain(ws)) for _, ws in conns]
        sem2 = asyncio.Semaphore(200)

        async def close_one(ws: Any) -> None:
            async with sem2:
                await ws.close()

        await asyncio.to_thread(churn.wait)
        await asyncio.gather(*(close_one(ws) for i, ws in conns if i % 2 == 0))
        await asyncio.to_thread(go_away.wait)
        await asyncio.gather(*(close_one(ws) for i, ws in conns if i % 2 == 1))
        for r in readers:
            r.cancel()
        return len(conns), frames

    out.put(asyncio.run(run()))


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counters(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pychat_gateway_"):
            name, v = line.split(" ")
            out[name.removeprefix("pychat_gateway_").removesuffix("_total")] = float(v)
    return out


def scenario(n: int, followers: int, procs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        ids = prepare(data, n, followers)
        srv = ServerProcess(
            data, env={"PYCHAT_PRESENCE_GRACE_MS": str(GRACE_MS), "PYCHAT_LOG_LEVEL": "warning"}
        )
        srv.start()
        try:
            assert srv.proc is not None
            SERVERS.append(server_code(srv.proc.pid))
            expires = int(time.time() * 1000) + 3_600_000
            tokens = [_core.sign_token(srv.secret, u, expires) for u in ids]
            connected = [mp.Event() for _ in range(procs)]
            churn, go_away = mp.Event(), mp.Event()
            q: Any = mp.Queue()
            indexed = list(enumerate(tokens))
            workers = [
                mp.Process(
                    target=_client,
                    args=(srv.ws_url, indexed[i::procs], f"127.0.0.{2 + i}", connected[i], churn, go_away, q),
                )
                for i in range(procs)
            ]
            c0, cpu0 = counters(srv.url), server_cpu(srv.proc.pid)
            t0 = time.monotonic()
            for w in workers:
                w.start()
            for e in connected:
                e.wait(600)
            connect_s = time.monotonic() - t0
            time.sleep(0.5)  # let the last changes be published
            c1, cpu1 = counters(srv.url), server_cpu(srv.proc.pid)
            churn.set()
            time.sleep(GRACE_MS / 1000 + 1.5)  # grace period, then the offline changes go out
            c2, cpu2 = counters(srv.url), server_cpu(srv.proc.pid)
            go_away.set()
            results = [q.get(timeout=600) for _ in workers]
            for w in workers:
                w.join()
            time.sleep(GRACE_MS / 1000 + 1.0)
            c3, cpu3 = counters(srv.url), server_cpu(srv.proc.pid)
        finally:
            srv.stop()
    users = sum(r[0] for r in results)

    def phase(a: dict[str, float], b: dict[str, float], cpu: float, movers: int) -> dict[str, Any]:
        frames = b.get("presence_frames", 0) - a.get("presence_frames", 0)
        changes = b.get("presence_changes", 0) - a.get("presence_changes", 0)
        return {
            "server_cpu_s": round(cpu, 3),
            "users_moving": movers,
            "server_cpu_us_per_user": round(cpu / movers * 1e6, 1),
            "presence_changes": int(changes),
            "presence_frames_sent": int(frames),
            "frames_per_user": round(frames / movers, 2),
        }

    return {
        "users": users,
        "followers_per_user": followers,
        "connect_seconds": round(connect_s, 2),
        "connect": phase(c0, c1, cpu1 - cpu0, users),
        "half_leave": phase(c1, c2, cpu2 - cpu1, (users + 1) // 2),
        "rest_leave": phase(c2, c3, cpu3 - cpu2, users // 2),
        "presence_frames_received_by_clients": sum(r[1] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--procs", type=int, default=4)
    args = ap.parse_args()
    plan = (
        [(1000, 0), (1000, 20)]
        if args.quick
        else [(2500, 0), (2500, 20), (10000, 0), (10000, 5), (10000, 20)]
    )
    runs = []
    for n, f in plan:
        r = scenario(n, f, args.procs)
        runs.append(r)
        print(json.dumps(r), flush=True)
    base = {r["users"]: r for r in runs if r["followers_per_user"] == 0}
    for r in runs:
        b = base.get(r["users"])
        if b and r is not b:
            for ph in ("connect", "half_leave", "rest_leave"):
                r[ph]["cpu_us_per_user_above_baseline"] = round(
                    r[ph]["server_cpu_us_per_user"] - b[ph]["server_cpu_us_per_user"], 1
                )
    out = {
        "grace_ms": GRACE_MS,
        "runs": runs,
    }
    record("presence_storm", out, one(SERVERS))


if __name__ == "__main__":
    main()
