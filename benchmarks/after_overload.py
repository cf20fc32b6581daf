"""Latency after an overload: does a server that was driven past saturation recover?

One pychat server holds the latency scenario's 19,000 connections (1,000 groups of 10 and
9,000 idle) through a sequence of open-loop runs on the same store: by default 20,000 msg/s
for 10 s (past saturation on 2 cores), then 5,000 msg/s right away, and twice more after 20 s
pauses (every user goes offline and comes back between runs). Each run records send->receive
p50/p99/p99.9, and from `/metrics` the server's own share: mean admission->engine and
admission->fan-out time, the fraction fanned out within 1/5/20 ms, batches and store time.

    .venv/bin/python benchmarks/after_overload.py
    .venv/bin/python benchmarks/after_overload.py --plan 10000:5,sleep:10,2000:5

To compare with another commit, build its extension into a worktree and run this from a
directory outside any clone with PYTHONPATH=<worktree> (the server is `python -m pychat`).
The results record the commit of the tree the server loaded its code from (read from the
server process), and whether that tree had uncommitted changes; `harness` is this checkout.
Writes benchmarks/results/after_overload-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from benchmarks.results import record  # noqa: E402

GROUPS, IDLE = 1000, 9000


def server_metrics(t: suite.Target) -> dict[str, float]:
    wanted = ("pychat_gateway_send", "pychat_engine_batch_events_", "pychat_store_batch_seconds_")
    out = {}
    for line in httpx.get(f"{t.srv.url}/metrics").text.splitlines():
        if line.startswith(wanted):
            name, value = line.split(" ")[:2]
            out[name] = float(value)
    return out


def server_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    sends = max(d.get("pychat_gateway_sends_timed_total", 0.0), 1.0)
    batches = max(d.get("pychat_engine_batch_events_count", 0.0), 1.0)
    return {
        "mean_admission_to_engine_ms": round(
            d.get("pychat_gateway_send_to_engine_us_total", 0.0) / sends / 1000, 3
        ),
        "mean_admission_to_fanout_ms": round(
            d.get("pychat_gateway_send_to_fanout_us_total", 0.0) / sends / 1000, 3
        ),
        **{
            f"fanned_out_within_{ms}ms": round(
                d.get(f"pychat_gateway_sends_fanned_out_within_{ms}ms_total", 0.0) / sends, 4
            )
            for ms in (1, 5, 20)
        },
        "batches": int(d.get("pychat_engine_batch_events_count", 0.0)),
        "mean_batch_events": round(d.get("pychat_engine_batch_events_sum", 0.0) / batches, 1),
        "mean_store_batch_ms": round(1000 * d.get("pychat_store_batch_seconds_sum", 0.0) / batches, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="20000:10,5000:5,sleep:20,5000:5,sleep:20,5000:5")
    args = ap.parse_args()
    steps = [tuple(step.split(":")) for step in args.plan.split(",")]

    def body(t: suite.Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
        groups = [
            {"chat_id": c, "members": [t.token[ids[g * 10 + k]] for k in range(10)]}
            for g, c in enumerate(chats)
        ]
        idle_tokens = [t.token[u] for u in ids[GROUPS * 10 :]]
        runs: list[dict[str, Any]] = []
        for kind, value in steps:
            if kind == "sleep":
                time.sleep(float(value))
                runs.append({"sleep_s": float(value)})
                continue
            before, (cpu0, _) = server_metrics(t), suite.proc_stats(t.pid)
            out = suite.run_loadgen(
                t.plan(
                    "latency",
                    groups=groups,
                    rate=float(kind),
                    seconds=float(value),
                    tokens=idle_tokens,
                    warmup_s=suite.WARMUP_S,
                )
            )
            cpu1, rss = suite.proc_stats(t.pid)
            run = {
                "rate": float(kind),
                "seconds": float(value),
                "send_to_receive": out["send_to_receive"],
                "send_to_ack": out["send_to_ack"],
                "server": server_share(before, server_metrics(t)),
                "server_cpu_s": round(cpu1 - cpu0, 2),
                "server_rss_mib": round(rss, 1),
                "lost": out["lost"],
                "duplicated": out["duplicated"],
                "out_of_order": out["out_of_order"],
            }
            r = run["send_to_receive"]
            print(
                f"{kind} msg/s, {value} s: p50/p99/p99.9 {r['p50_ms']}/{r['p99_ms']}/{r['p999_ms']} ms; "
                f"server {run['server']}; lost/dup/ooo {run['lost']}/{run['duplicated']}/{run['out_of_order']}",
                flush=True,
            )
            runs.append(run)
        return {"groups": GROUPS, "idle": IDLE, "runs": runs}

    result = suite.with_target(
        "pychat", GROUPS * 10 + IDLE, [list(range(g * 10, g * 10 + 10)) for g in range(GROUPS)], 0, body
    )
    record("after_overload", result, suite.measured_code())


if __name__ == "__main__":
    main()
