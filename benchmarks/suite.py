"""The benchmark suite: pychat against the compiled load generator
(benchmarks/loadgen), with a naive Python server measured in the same run as
the baseline. `make bench-quick` runs every scenario small (about a minute);
`make bench` runs them at the sizes of the performance targets.

Writes benchmarks/results/suite-<time>.json and benchmarks/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.presence_storm import prepare  # noqa: E402
from benchmarks.results import record  # noqa: E402
from pychat import _core  # noqa: E402
from tests.conftest import ServerProcess, free_port  # noqa: E402

# Built by `make loadgen` into the Makefile's target dir (CARGO_TARGET_DIR, default ~/.cache/pychat/target).
_TARGET = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "pychat" / "target"))
LOADGEN = Path(_TARGET) / "release" / "pychat-loadgen"
SOURCE_IPS = [f"127.0.0.{i}" for i in range(2, 10)]
# The benchmark measures the engine, not the abuse guards.
UNLIMITED = {
    "PYCHAT_SEND_PER_S": "100000000",
    "PYCHAT_SEND_BURST": "100000000",
    "PYCHAT_UPGRADES_PER_S": "100000",
    "PYCHAT_UPGRADE_BURST": "100000",
    "PYCHAT_QUEUE_CAPACITY": "65536",
    "PYCHAT_LOG_LEVEL": "warning",
}


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def add_groups(data: Path, ids: list[str], groups: list[list[int]], messages: int = 0) -> list[str]:
    """Group chats of the given members; each optionally pre-filled with `messages` messages."""
    db = sqlite3.connect(data / "pychat.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    now = int(time.time() * 1000)
    chat_ids = []
    for g, members in enumerate(groups):
        chat_id = f"g{g:06d}"
        chat_ids.append(chat_id)
        chat_no = db.execute(
            "INSERT INTO chats (chat_id, kind, created_by, created_at, last_activity, last_seq) VALUES (?, 'group', ?, ?, ?, ?)",
            (chat_id, ids[members[0]], now, now, messages),
        ).lastrowid
        (sender_no,) = db.execute(
            "SELECT user_no FROM users WHERE user_id = ?", (ids[members[0]],)
        ).fetchone()
        db.executemany(
            "INSERT INTO user_chats (user_id, chat_id, joined_at) VALUES (?, ?, ?)",
            [(ids[m], chat_id, now) for m in members],
        )
        db.executemany(
            "INSERT INTO messages (chat_no, seq, message_id, sender_no, content, created_at, client_msg_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(chat_no, s, f"m{g}-{s}", sender_no, "x" * 64, now, f"pre{s}") for s in range(1, messages + 1)],
        )
    db.execute("COMMIT")
    db.close()
    return chat_ids


def run_loadgen(plan: dict[str, Any], on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    proc = subprocess.Popen([str(LOADGEN), f.name], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    for line in proc.stdout:
        value = json.loads(line)
        if value.get("event") == "ready":
            if on_ready:
                on_ready()
        else:
            result = value
    proc.wait()
    proc.stdout.close()
    os.unlink(f.name)
    return result


class Target:
    """A server under test: pychat, or the naive baseline."""

    def __init__(self, kind: str, data: Path, ids: list[str], chats: dict[str, list[str]]) -> None:
        self.kind, self.data = kind, data
        if kind == "pychat":
            self.srv = ServerProcess(data, env=UNLIMITED)
            self.srv.start()
            assert self.srv.proc is not None
            self.pid, self.port = self.srv.proc.pid, self.srv.ws_port
            expires = int(time.time() * 1000) + 3_600_000
            self.token = {u: _core.sign_token(self.srv.secret, u, expires) for u in ids}
        else:
            (data / "chats.json").write_text(json.dumps(chats))
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "benchmarks/baselines/naive_server.py"),
                    "--port",
                    str(self.port),
                    "--chats",
                    str(data / "chats.json"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stdout is not None
            self.proc.stdout.readline()  # "ready"
            self.pid = self.proc.pid
            self.token = {u: f"v1.{u}.0.x" for u in ids}

    def plan(self, scenario: str, **kw: Any) -> dict[str, Any]:
        return {"scenario": scenario, "server": f"127.0.0.1:{self.port}", "source_ips": SOURCE_IPS, **kw}

    def stop(self) -> None:
        if self.kind == "pychat":
            self.srv.stop()
        else:
            self.proc.terminate()
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def with_target(
    kind: str,
    users: int,
    groups: list[list[int]],
    messages: int,
    body: Callable[[Target, list[str], list[str]], dict[str, Any]],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        ids = prepare(data, users, 0)
        chat_ids = add_groups(data, ids, groups, messages)
        target = Target(
            kind, data, ids, {c: [ids[m] for m in g] for c, g in zip(chat_ids, groups, strict=True)}
        )
        try:
            return body(target, ids, chat_ids)
        finally:
            target.stop()


def idle(kind: str, n: int, hold: float) -> dict[str, Any]:
    def body(t: Target, ids: list[str], _: list[str]) -> dict[str, Any]:
        time.sleep(0.5)
        _, base_rss = proc_stats(t.pid)
        sample: dict[str, float] = {}

        def ready() -> None:
            time.sleep(1.0)
            sample["rss"] = proc_stats(t.pid)[1]

        out = run_loadgen(t.plan("idle", tokens=[t.token[u] for u in ids], seconds=hold), ready)
        per_conn = (sample["rss"] - base_rss) * 1024 * 1024 / max(out["connected"], 1)
        return {
            **out,
            "server_rss_mb": {"empty": round(base_rss, 1), "connected": round(sample["rss"], 1)},
            "bytes_per_connection": round(per_conn),
        }

    return with_target(kind, n, [], 0, body)


def fanout(kind: str, receivers: int, messages: int) -> dict[str, Any]:
    def body(t: Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
        cpu0, _ = proc_stats(t.pid)
        out = run_loadgen(
            t.plan("fanout", tokens=[t.token[u] for u in ids], chat_id=chats[0], messages=messages, window=64)
        )
        cpu = proc_stats(t.pid)[0] - cpu0
        return {
            **out,
            "server_cpu_s": round(cpu, 2),
            "deliveries_per_cpu_s": round(out["deliveries"] / max(cpu, 0.01)),
        }

    return with_target(kind, receivers + 1, [list(range(receivers + 1))], 0, body)


def latency(
    kind: str, groups: int, rate: float, seconds: float, idle_n: int, sweep: tuple[float, ...] = ()
) -> dict[str, Any]:
    """Open-loop latency at `rate`, then at each rate of `sweep` (where p99 stays low and where
    it turns). Each rate gets a fresh server: one that has just been driven past saturation
    keeps a latency tail for a while (seen: p99 68 ms at 5,000 msg/s right after the
    20,000 msg/s run, 7-9 ms on a fresh one), which is worth its own look but is not what the
    sweep measures."""

    def measure(r: float, secs: float) -> dict[str, Any]:
        def body(t: Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
            plan_groups = [
                {"chat_id": c, "members": [t.token[ids[g * 10 + k]] for k in range(10)]}
                for g, c in enumerate(chats)
            ]
            idle_tokens = [t.token[u] for u in ids[groups * 10 :]]
            cpu0, _ = proc_stats(t.pid)
            out = run_loadgen(
                t.plan(
                    "latency", groups=plan_groups, rate=r, seconds=secs, tokens=idle_tokens, warmup_s=WARMUP_S
                )
            )
            return {**out, "server_cpu_s": round(proc_stats(t.pid)[0] - cpu0, 2)}

        return with_target(
            kind, groups * 10 + idle_n, [list(range(g * 10, g * 10 + 10)) for g in range(groups)], 0, body
        )

    out = measure(rate, seconds)
    if sweep:
        out["sweep"] = [measure(r, SWEEP_SECONDS) for r in sweep]
    return out


# Seconds between all connections being up and the first send: the server first stores the
# connect storm's last-seen times, which is not what the latency scenario measures.
WARMUP_S = 3.0

# Seconds measured at each rate of the latency sweep.
SWEEP_SECONDS = 5.0


# Frames on the wire per message in the latency scenario: the send, its ack and 9 msgs.
FRAMES_PER_MESSAGE = 11


def floor(rates: tuple[float, ...], pairs: int, seconds: float) -> list[dict[str, Any]]:
    """Loopback TCP alone, no server: the load generator writes the frames a latency run puts
    on the wire (one write per frame, round-robin over `pairs` connections whose both ends it
    holds) and reads them back. Its CPU and latency at each rate are the floor under any
    server's figure on these cores."""
    runs = []
    for rate in rates:
        plan = {"scenario": "floor", "server": "127.0.0.1:1", "pairs": pairs, "seconds": seconds}
        out = run_loadgen({**plan, "rate": rate * FRAMES_PER_MESSAGE})
        runs.append({"messages_per_s": rate, **out})
    return runs


def persist(connections: int, seconds: float, repeats: int) -> dict[str, Any]:
    """Durable acks per second: the median of `repeats` runs against one server (this figure
    moves by +-5% from run to run on a shared machine)."""

    def body(t: Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
        plan_groups = [{"chat_id": c, "members": [t.token[ids[i]]]} for i, c in enumerate(chats)]
        runs = [
            run_loadgen(t.plan("persist", groups=plan_groups, seconds=seconds, window=64))
            for _ in range(repeats)
        ]
        out = {
            **sorted(runs, key=lambda r: float(r["acked_per_s"]))[len(runs) // 2],
            "runs_acked_per_s": [round(r["acked_per_s"]) for r in runs],
            "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs),
            "out_of_order": sum(r["out_of_order"] for r in runs),
        }
        metrics = __import__("httpx").get(f"{t.srv.url}/metrics").text
        sums = {
            ln.split(" ")[0]: float(ln.split(" ")[1])
            for ln in metrics.splitlines()
            if ln.startswith("pychat_engine_batch_events_")
        }
        count = sums.get("pychat_engine_batch_events_count", 0.0)
        return {
            **out,
            "mean_batch_events": round(sums.get("pychat_engine_batch_events_sum", 0.0) / max(count, 1), 1),
            # After every run: the idempotency window is full (1,000,000 acked keys by default).
            "server_rss_mib_after": round(proc_stats(t.pid)[1], 1),
        }

    return with_target("pychat", connections, [[i] for i in range(connections)], 0, body)


def sync(chats: int, per_chat: int) -> dict[str, Any]:
    def body(t: Target, ids: list[str], chat_ids: list[str]) -> dict[str, Any]:
        return run_loadgen(
            t.plan("sync", tokens=[t.token[ids[1]]], expected=dict.fromkeys(chat_ids, per_chat))
        )

    return with_target("pychat", 2, [[0, 1]] * 0 + [[0, 1] for _ in range(chats)], per_chat, body)


SIZES = {
    "quick": {
        "idle": 2000,
        "fanout": (200, 2000),
        "latency": (100, 2000.0, 3.0, 0, ()),
        "persist": (16, 3.0, 1),
        "sync": (20, 100),
        "floor": (500, 1.0),
    },
    "full": {
        "idle": 19000,
        "fanout": (1000, 20000),
        "latency": (1000, 20000.0, 10.0, 9000, (2000.0, 5000.0, 10000.0)),
        "persist": (64, 6.0, 3),
        "sync": (100, 100),
        # 9,000 connections, both ends in one process: 18,000 of its 20,000 files.
        "floor": (9000, 5.0),
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="idle,fanout,latency,persist,sync")
    args = ap.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    only = set(args.only.split(","))
    results: dict[str, Any] = {"size": "quick" if args.quick else "full"}
    if "idle" in only:
        results["idle"] = {
            "pychat": idle("pychat", size["idle"], 3.0),
            "baseline": idle("naive", min(size["idle"], 5000), 3.0),
        }
    if "fanout" in only:
        r, m = size["fanout"]
        results["fanout"] = {"pychat": fanout("pychat", r, m), "baseline": fanout("naive", r, m // 10)}
    if "latency" in only:
        g, rate, secs, idle_n, sweep = size["latency"]
        results["latency"] = {
            "pychat": latency("pychat", g, rate, secs, idle_n, sweep),
            "baseline": latency("naive", min(g, 100), 2000.0, secs, 0),
        }
        if not args.quick:
            # The baseline's own shape (100 groups, 2,000 msg/s, no idle), for a like-for-like ratio.
            results["latency"]["pychat_at_baseline"] = latency("pychat", min(g, 100), 2000.0, secs, 0)
        results["latency"]["floor"] = floor((*sweep, rate), *size["floor"])
    if "persist" in only:
        results["persist"] = {"pychat": persist(*size["persist"])}
    if "sync" in only:
        results["sync"] = {"pychat": sync(*size["sync"])}
    path = record("suite", results)
    print(summary(results))
    plot(results, path.with_suffix(".png"))


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"| scenario | pychat | naive baseline | ratio | lost / dup / out-of-order ({r['size']}) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def errs(x: dict[str, Any]) -> str:
        return f"{x.get('lost', 0)} / {x.get('duplicated', 0)} / {x.get('out_of_order', 0)}"

    if "idle" in r:
        p, b = r["idle"]["pychat"], r["idle"]["baseline"]
        lines.append(
            f"| idle: bytes per connection ({p['connected']} held) | {p['bytes_per_connection']} | {b['bytes_per_connection']} | {b['bytes_per_connection'] / max(p['bytes_per_connection'], 1):.1f}x less | - |"
        )
    if "fanout" in r:
        p, b = r["fanout"]["pychat"], r["fanout"]["baseline"]
        lines.append(
            f"| fanout: deliveries/s ({p['receivers']} receivers) | {p['deliveries_per_s']:,.0f} | {b['deliveries_per_s']:,.0f} | {p['deliveries_per_s'] / max(b['deliveries_per_s'], 1):.1f}x | {errs(p)} |"
        )
        lines.append(
            f"| fanout: deliveries per server CPU-second | {p['deliveries_per_cpu_s']:,} | {b['deliveries_per_cpu_s']:,} | {p['deliveries_per_cpu_s'] / max(b['deliveries_per_cpu_s'], 1):.1f}x | - |"
        )
    if "latency" in r:
        p, b = r["latency"]["pychat"], r["latency"]["baseline"]
        lines.append(
            f"| latency: p50 / p99 / p99.9 send->receive, ms ({p['rate']:.0f} msg/s, {p['groups']} groups, {p['idle']} idle) | "
            f"{p['send_to_receive']['p50_ms']} / {p['send_to_receive']['p99_ms']} / {p['send_to_receive']['p999_ms']} | "
            f"{b['send_to_receive']['p50_ms']} / {b['send_to_receive']['p99_ms']} (at {b['rate']:.0f} msg/s) | - | {errs(p)} |"
        )
        if "pychat_at_baseline" in r["latency"]:
            x = r["latency"]["pychat_at_baseline"]
            lines.append(
                f"| latency: like the baseline ({x['rate']:.0f} msg/s, {x['groups']} groups, {x['idle']} idle) | "
                f"{x['send_to_receive']['p50_ms']} / {x['send_to_receive']['p99_ms']} / {x['send_to_receive']['p999_ms']} | "
                f"{b['send_to_receive']['p50_ms']} / {b['send_to_receive']['p99_ms']} / {b['send_to_receive']['p999_ms']} | - | {errs(x)} |"
            )
        for x in p.get("sweep", []):
            lines.append(
                f"| latency: same, at {x['rate']:.0f} msg/s | "
                f"{x['send_to_receive']['p50_ms']} / {x['send_to_receive']['p99_ms']} / {x['send_to_receive']['p999_ms']} | - | - | {errs(x)} |"
            )
        for x in r["latency"].get("floor", []):
            w = x["write_to_read"]
            lines.append(
                f"| floor, no server: loopback TCP alone at {x['rate']:,.0f} frames/s (= {x['messages_per_s']:.0f} msg/s x {FRAMES_PER_MESSAGE}), "
                f"{x['pairs']} connections: p50 / p99 / p99.9 ms; cores busy; CPU per frame | "
                f"{w['p50_ms']} / {w['p99_ms']} / {w['p999_ms']}; {x['cores_busy']:.2f} cores; {x['cpu_us_per_delivery']:.1f} us "
                f"({x['cpu_system_s'] / max(x['cpu_user_s'] + x['cpu_system_s'], 1e-9):.0%} kernel) | - | - | {errs(x)} |"
            )
    if "persist" in r:
        p = r["persist"]["pychat"]
        lines.append(
            f"| persist: acked durable msgs/s (batch {p['mean_batch_events']}; median of {len(p['runs_acked_per_s'])}: {', '.join(f'{x:,}' for x in p['runs_acked_per_s'])}) | {p['acked_per_s']:,.0f} | - | - | {errs(p)} |"
        )
    if "sync" in r:
        p = r["sync"]["pychat"]
        lines.append(
            f"| sync: {p['messages']} missed messages in {p['chats']} chats, s to synced | {p['seconds_to_synced']:.3f} | - | - | {errs(p)} |"
        )
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "latest.md").write_text(text)
    return text


def plot(r: dict[str, Any], path: Path) -> None:
    """Bars of pychat against the baseline for each comparable figure (baseline = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float]] = []
    if "idle" in r:
        p, b = r["idle"]["pychat"], r["idle"]["baseline"]
        bars.append(
            (
                "idle: memory\nper connection\n(lower is better)",
                p["bytes_per_connection"] / max(b["bytes_per_connection"], 1),
            )
        )
    if "fanout" in r:
        p, b = r["fanout"]["pychat"], r["fanout"]["baseline"]
        bars.append(("fanout:\ndeliveries/s", p["deliveries_per_s"] / max(b["deliveries_per_s"], 1)))
        bars.append(
            (
                "fanout: deliveries\nper CPU-second",
                p["deliveries_per_cpu_s"] / max(b["deliveries_per_cpu_s"], 1),
            )
        )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.bar([n for n, _ in bars], [v for _, v in bars], color="#3b7dd8")
    ax1.axhline(1.0, color="#999", linestyle="--", linewidth=1)
    ax1.set_ylabel("pychat / naive baseline (same run)")
    ax1.set_title(f"Against the baseline ({r['size']} run)")
    if "latency" in r:
        p = r["latency"]["pychat"]
        runs = sorted([p, *p.get("sweep", [])], key=lambda x: x["rate"])
        for q, color in (("p50_ms", "#3b7dd8"), ("p99_ms", "#d8843b"), ("p999_ms", "#b03030")):
            ax2.plot(
                [x["rate"] for x in runs],
                [x["send_to_receive"][q] for x in runs],
                marker="o",
                color=color,
                label=q.removesuffix("_ms"),
            )
        floor_runs = sorted(r["latency"].get("floor", []), key=lambda x: x["messages_per_s"])
        if floor_runs:
            ax2.plot(
                [x["messages_per_s"] for x in floor_runs],
                [x["write_to_read"]["p99_ms"] for x in floor_runs],
                marker="x",
                linestyle="--",
                color="#777",
                label="p99 of loopback TCP alone",
            )
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("messages/s (open loop)")
        ax2.set_ylabel("send -> receive, ms")
        ax2.legend()
        ax2.set_title(f"Latency, {p['groups']} groups, {p['idle']} idle connections")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path.resolve().relative_to(ROOT)}")


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
