"""Reconnect storm: N connections are dropped at once (every client aborts its
socket together, as in a network blip) and reconnect with the SDK's policy:
jittered backoff, and the server's `retry_after_ms` when it answers
`rate_limited`. Records the time to full recovery, how many upgrades were told
to wait, and the server's memory; the server must stay up throughout.

    .venv/bin/python benchmarks/reconnect_storm.py --connections 15000

Writes benchmarks/results/reconnect_storm-<time>.json. A bounded version runs
in `make test` (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.presence_storm import prepare  # noqa: E402
from benchmarks.results import record, server_code  # noqa: E402
from pychat import _core  # noqa: E402
from pychat.client import ChatError, open_websocket, retry_delay  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


async def _connect(ws_url: str, token: str, counts: dict[str, int]) -> Any:
    attempt = 0
    while True:
        try:
            ws, _ = await open_websocket(ws_url, token)
            return ws
        except ChatError as e:
            counts["told_to_wait" if e.retry_after_ms else "refused"] += 1
            await asyncio.sleep(retry_delay(attempt, e.retry_after_ms))
        except (OSError, TimeoutError):
            counts["refused"] += 1
            await asyncio.sleep(retry_delay(attempt))
        attempt += 1


async def storm(ws_url: str, tokens: list[str], wait_for_drop: Any = None) -> dict[str, Any]:
    """Connects every token, drops all at once, reconnects all; returns timings and counts."""
    counts = {"told_to_wait": 0, "refused": 0}
    t0 = time.monotonic()
    conns = await asyncio.gather(*(_connect(ws_url, t, counts) for t in tokens))
    first_connect_s = time.monotonic() - t0
    if wait_for_drop is not None:
        await asyncio.to_thread(wait_for_drop)
    for ws in conns:
        ws.transport.abort()  # every socket at once, no close handshake
    dropped_at = time.monotonic()
    during = dict(counts)
    conns = await asyncio.gather(*(_connect(ws_url, t, counts) for t in tokens))
    recovery_s = time.monotonic() - dropped_at
    for ws in conns:
        ws.transport.abort()
    return {
        "connections": len(conns),
        "first_connect_s": round(first_connect_s, 2),
        "recovery_s": round(recovery_s, 2),
        "told_to_wait_first": during["told_to_wait"],
        "told_to_wait_storm": counts["told_to_wait"] - during["told_to_wait"],
        "refused": counts["refused"],
    }


def _worker(ws_url: str, tokens: list[str], barrier: Any, out: Any) -> None:
    out.put(asyncio.run(storm(ws_url, tokens, barrier.wait)))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=15000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--users", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        ids = prepare(data, args.users, 0)
        srv = ServerProcess(
            data,
            env={
                "PYCHAT_LOG_LEVEL": "warning",
                # One address holds the whole storm, beyond the caps one attacker gets.
                "PYCHAT_MAX_CONNECTIONS": "100000",
                "PYCHAT_MAX_CONNECTIONS_PER_ADDRESS": "100000",
            },
        )
        srv.start()
        assert srv.proc is not None
        pid = srv.proc.pid
        measured = server_code(pid)
        try:
            expires = int(time.time() * 1000) + 3_600_000
            tokens = [
                _core.sign_token(srv.secret, ids[i % len(ids)], expires) for i in range(args.connections)
            ]
            barrier = mp.Barrier(args.procs + 1)
            q: Any = mp.Queue()
            workers = [
                mp.Process(target=_worker, args=(srv.ws_url, tokens[i :: args.procs], barrier, q))
                for i in range(args.procs)
            ]
            idle_rss = _rss_mb(pid)
            for w in workers:
                w.start()
            barrier.wait()  # all connected
            connected_rss = _rss_mb(pid)
            peak = [connected_rss]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    peak[0] = max(peak[0], _rss_mb(pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            results = [q.get(timeout=900) for _ in workers]
            sampling.set()
            sampler.join()
            for w in workers:
                w.join()
            alive = srv.proc.poll() is None
        finally:
            srv.stop()
    out = {
        "connections": sum(r["connections"] for r in results),
        "first_connect_s": max(r["first_connect_s"] for r in results),
        "recovery_s": max(r["recovery_s"] for r in results),
        "told_to_wait_during_storm": sum(r["told_to_wait_storm"] for r in results),
        "refused": sum(r["refused"] for r in results),
        "server_alive_throughout": alive,
        "server_rss_mb": {
            "idle": round(idle_rss, 1),
            "connected": round(connected_rss, 1),
            "peak_during_storm": round(peak[0], 1),
        },
    }
    record("reconnect_storm", out, measured)


if __name__ == "__main__":
    main()
