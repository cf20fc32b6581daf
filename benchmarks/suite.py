"""The benchmark suite: pychat against the compiled load generator
(benchmarks/loadgen), with a naive Python server measured in the same run as
the baseline. `make bench-quick` runs every scenario small (about a minute);
`make bench` runs them at the sizes of the performance targets.

Writes benchmarks/results/suite-<time>.json and benchmarks/results/latest.md, and exits
with status 1 when any scenario lost, duplicated or reordered a message or failed a check.
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
from benchmarks.results import Code, one, record, server_code, tree_code  # noqa: E402
from pychat import _core  # noqa: E402
from pychat.config import load_config  # noqa: E402
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
    "PYCHAT_MAX_CONNECTIONS": "100000",
    "PYCHAT_MAX_CONNECTIONS_PER_USER": "100000",
    "PYCHAT_MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "PYCHAT_LOG_LEVEL": "warning",
}

# More environment for every pychat server this process starts (benchmarks/plugin_cost.py sets
# PYCHAT_CONFIG to load plugins).
SERVER_ENV: dict[str, str] = {}

# The code every pychat server of this process ran (`server_code`), for the results' commit.
SERVERS: list[Code] = []


def measured_code() -> Code:
    """The code under test of this process's runs: the tree its pychat servers were loaded from
    (this checkout when none ran: the floor and the naive baseline are the harness's own)."""
    return one(SERVERS) if SERVERS else tree_code(ROOT)


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
    if proc.returncode != 0:  # e.g. a plan field this binary does not know: rebuild it (`make loadgen`)
        raise RuntimeError(f"pychat-loadgen failed (exit {proc.returncode}) on a {plan['scenario']} plan")
    return result


class Target:
    """A server under test: pychat, or the naive baseline."""

    def __init__(self, kind: str, data: Path, ids: list[str], chats: dict[str, list[str]]) -> None:
        self.kind, self.data = kind, data
        if kind == "pychat":
            self.srv = ServerProcess(data, env={**UNLIMITED, **SERVER_ENV})
            self.srv.start()
            assert self.srv.proc is not None
            self.pid, self.port = self.srv.proc.pid, self.srv.ws_port
            try:
                SERVERS.append(server_code(self.pid))
            except BaseException:
                self.srv.stop()
                raise
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


def member_groups(n: int, per_user: int, size: int) -> list[list[int]]:
    """Groups of `size` in which each of users 0..n-1 (n a multiple of `size`) is a member of
    `per_user`: round r cuts the users, shifted by 3r, into consecutive runs of `size`, so a
    user's groups are all different chats with partly different members."""
    return [
        [(g * size + 3 * r + k) % n for k in range(size)] for r in range(per_user) for g in range(n // size)
    ]


def idle(
    kind: str, n: int, hold: float, groups_per_user: int = 0, group_size: int = 10, messages: int = 0
) -> dict[str, Any]:
    """Server memory per held connection. With `groups_per_user`, every user is a member of
    that many groups of `group_size` holding `messages` messages each, and each connection
    sends `sync` and has its `synced` (every chat's messages read) before memory is read: the
    per-connection cost of users who have chats, not of bare sockets."""
    groups = member_groups(n, groups_per_user, group_size) if groups_per_user else []

    def body(t: Target, ids: list[str], _chat_ids: list[str]) -> dict[str, Any]:
        time.sleep(0.5)
        _, base_rss = proc_stats(t.pid)
        sample: dict[str, float] = {}

        def ready() -> None:
            time.sleep(1.0)
            sample["rss"] = proc_stats(t.pid)[1]

        plan = t.plan("idle", tokens=[t.token[u] for u in ids], seconds=hold)
        if groups_per_user:
            plan["sync_expect"] = {"chats": groups_per_user, "messages": groups_per_user * messages}
        out = run_loadgen(plan, ready)
        per_conn = (sample["rss"] - base_rss) * 1024 * 1024 / max(out["connected"], 1)
        extra: dict[str, Any] = {}
        if groups_per_user:
            extra = {
                "groups_per_user": groups_per_user,
                "group_size": group_size,
                "messages_per_chat": messages,
                # Every connection must have had its `synced`, with every chat.
                "errors": (out["connected"] - out["synced"]) + out["sync_incomplete"],
            }
        return {
            **out,
            **extra,
            "server_rss_mb": {"empty": round(base_rss, 1), "connected": round(sample["rss"], 1)},
            "bytes_per_connection": round(per_conn),
        }

    return with_target(kind, n, groups, messages, body)


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


# What the floor scenario is, in every results file that has one.
FLOOR_ABOUT = {
    "shows": (
        "CPU per frame of loopback TCP (kernel and tokio: one write per frame, one wake-up and "
        "read per receiving connection) and the latency of that kernel path at the latency "
        "scenario's frame rate, measured like the server: from the instant a frame is written "
        "to its read, with as many writer threads as the server's gateway runtime has workers"
    ),
    "does_not_show": (
        "parsing, fan-out logic, the store, acks, or the server's queues: no chat server runs; "
        "it is the floor under any server's figure on these cores, not an estimate of pychat's"
    ),
}


def floor(rates: tuple[float, ...], pairs: int, seconds: float) -> dict[str, Any]:
    """Loopback TCP alone, no server: the load generator writes the frames a latency run puts
    on the wire (one write per frame, round-robin over `pairs` connections whose both ends it
    holds, from as many threads as the server's gateway has workers) and reads them back. Its
    CPU and latency at each rate are the floor under any server's figure on these cores."""
    # The servers of this suite run with the gateway's default worker count (or the environment's).
    writers = load_config(env={**os.environ, **UNLIMITED}).runtime_threads
    runs = []
    for rate in rates:
        plan = {"scenario": "floor", "server": "127.0.0.1:1", "pairs": pairs, "seconds": seconds}
        out = run_loadgen({**plan, "rate": rate * FRAMES_PER_MESSAGE, "writers": writers})
        runs.append({"messages_per_s": rate, **out})
    return {**FLOOR_ABOUT, "writer_threads": writers, "frames_per_message": FRAMES_PER_MESSAGE, "runs": runs}


# Acks whose content is compared with the store's (all are checked for presence and seq).
CONTENT_SAMPLE = 1000


def persist(connections: int, seconds: float, repeats: int) -> dict[str, Any]:
    """Durable acks per second: the median of `repeats` runs against one server (this figure
    moves by +-5% from run to run on a shared machine). Then what it claims is checked
    (`verify_persist`): every ack in seq order per chat, and the store, read back from its file
    once the server has stopped, holds exactly the acked messages."""

    def body(t: Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
        plan_groups = [{"chat_id": c, "members": [t.token[ids[i]]]} for i, c in enumerate(chats)]
        acks = [t.data / f"acks-{i}.tsv" for i in range(repeats)]
        runs = [
            run_loadgen(
                t.plan(
                    "persist",
                    groups=plan_groups,
                    seconds=seconds,
                    window=64,
                    acks_file=str(path),
                    verify_sample=max(CONTENT_SAMPLE // repeats, 1),
                )
            )
            for path in acks
        ]
        batch_events = mean_batch_events(t.srv.url)
        # After every run: the idempotency window is full (1,000,000 acked keys by default).
        rss_after = round(proc_stats(t.pid)[1], 1)
        t.stop()
        senders = {c: ids[i] for i, c in enumerate(chats)}
        check = verify_persist(t.data / "pychat.db", runs, acks, senders)
        for r in runs:
            r.pop("chats", None)  # per-chat seq ranges: checked above, too long to keep
        out = {
            **sorted(runs, key=lambda r: float(r["acked_per_s"]))[len(runs) // 2],
            "runs_acked_per_s": [round(r["acked_per_s"]) for r in runs],
            "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs),
            "out_of_order": sum(r["out_of_order"] for r in runs),
            # Sends the server refused, and every check below that failed.
            "errors": sum(r["errors"] for r in runs) + len(check["problems"]),
            "verify": check,
        }
        return {
            **out,
            "mean_batch_events": batch_events,
            "server_rss_mib_after": rss_after,
        }

    return with_target("pychat", connections, [[i] for i in range(connections)], 0, body)


def mean_batch_events(server_url: str) -> float:
    """Sends and pointer moves per engine batch so far, from a server's /metrics."""
    sums = {
        ln.split(" ")[0]: float(ln.split(" ")[1])
        for ln in __import__("httpx").get(f"{server_url}/metrics").text.splitlines()
        if ln.startswith("pychat_engine_batch_events_")
    }
    count = sums.get("pychat_engine_batch_events_count", 0.0)
    return round(sums.get("pychat_engine_batch_events_sum", 0.0) / max(count, 1), 1)


def verify_persist(
    db_path: Path, runs: list[dict[str, Any]], ack_files: list[Path], senders: dict[str, str]
) -> dict[str, Any]:
    """Checks a persist scenario's claims against what the generator received and what the
    store holds. Acks: per chat, strictly increasing seqs with no gap or repeat, within each run
    and from one run to the next, starting at 1 (the chats start empty). Store: as many
    messages as acks; each ack's (chat, seq) row has its message_id, client_msg_id and sender;
    for a sample, the content sent; each chat's last_seq is its last acked seq. Returns the
    counts and a list of problems (empty when every check passed)."""
    problems: list[str] = []
    next_seq: dict[str, int] = dict.fromkeys(senders, 1)
    for i, r in enumerate(runs):
        bad = {k: v for k, v in r.get("ack_seqs", {}).items() if v}
        if bad:
            problems.append(f"run {i}: acks out of seq order within a chat: {bad}")
        if "acks_file_error" in r:
            problems.append(f"run {i}: acks not written: {r['acks_file_error']}")
        for c in r.get("chats", []):
            if not c["acked"]:
                continue
            if c["first_seq"] != next_seq.get(c["chat_id"]):
                problems.append(
                    f"run {i}, chat {c['chat_id']}: first acked seq {c['first_seq']}, expected {next_seq.get(c['chat_id'])}"
                )
            next_seq[c["chat_id"]] = c["last_seq"] + 1
    acked = sum(r["acked"] for r in runs)

    # The acks go into a scratch file beside the store (millions of rows in a full run).
    scratch = db_path.with_name("verify.db")
    scratch.unlink(missing_ok=True)
    db = sqlite3.connect(db_path)
    try:
        db.execute("ATTACH ? AS v", (str(scratch),))
        db.execute("PRAGMA v.journal_mode=OFF")
        db.execute("PRAGMA v.synchronous=OFF")
        db.execute(
            "CREATE TABLE v.acks (chat_id TEXT, seq INTEGER, message_id TEXT, client_msg_id TEXT, content TEXT)"
        )
        db.execute("CREATE TABLE v.senders (chat_id TEXT PRIMARY KEY, user_id TEXT)")
        db.executemany("INSERT INTO v.senders VALUES (?, ?)", senders.items())
        for path in ack_files:
            if path.exists():
                with path.open() as f:
                    db.executemany(
                        "INSERT INTO v.acks VALUES (?, ?, ?, ?, ?)",
                        (line.rstrip("\n").split("\t") for line in f),
                    )
        (in_files,) = db.execute("SELECT count(*) FROM v.acks").fetchone()
        (distinct,) = db.execute("SELECT count(*) FROM (SELECT DISTINCT chat_id, seq FROM v.acks)").fetchone()
        (stored,) = db.execute(
            "SELECT count(*) FROM messages WHERE chat_no IN (SELECT chat_no FROM chats WHERE chat_id IN (SELECT chat_id FROM v.senders))"
        ).fetchone()
        # One row per ack: the store's row at its (chat, seq), NULLs when there is none.
        joined = """
            FROM v.acks a
            LEFT JOIN chats c ON c.chat_id = a.chat_id
            LEFT JOIN messages m ON m.chat_no = c.chat_no AND m.seq = a.seq
            LEFT JOIN users u ON u.user_no = m.sender_no
            LEFT JOIN v.senders s ON s.chat_id = a.chat_id
        """
        wrong = "m.message_id IS NOT a.message_id OR m.client_msg_id IS NOT a.client_msg_id OR u.user_id IS NOT s.user_id"
        (not_stored,) = db.execute(f"SELECT count(*) {joined} WHERE {wrong}").fetchone()
        examples = db.execute(
            f"SELECT a.chat_id, a.seq, a.message_id, m.message_id {joined} WHERE {wrong} LIMIT 3"
        ).fetchall()
        (sampled, content_wrong) = db.execute(
            f"SELECT count(*), coalesce(sum(m.content IS NOT a.content), 0) {joined} WHERE a.content != ''"
        ).fetchone()
        (last_seq_wrong,) = db.execute(
            """SELECT count(*) FROM chats c JOIN v.senders s ON s.chat_id = c.chat_id
               LEFT JOIN (SELECT chat_id, max(seq) AS top FROM v.acks GROUP BY chat_id) a ON a.chat_id = c.chat_id
               WHERE c.last_seq != coalesce(a.top, 0)"""
        ).fetchone()
    finally:
        db.close()
        scratch.unlink(missing_ok=True)
    if in_files != acked:
        problems.append(f"{acked} acks counted, {in_files} written to the ack files")
    if distinct != in_files:
        problems.append(f"{in_files - distinct} acks repeat a (chat, seq)")
    if stored != acked:
        problems.append(f"the store holds {stored} messages in these chats, {acked} were acked")
    if not_stored:
        problems.append(
            f"{not_stored} acks have no matching row (message_id, client_msg_id, sender): e.g. {examples}"
        )
    if content_wrong:
        problems.append(f"{content_wrong} of {sampled} sampled acks have other content in the store")
    if not sampled and acked:
        problems.append("no content was checked")
    if last_seq_wrong:
        problems.append(f"{last_seq_wrong} chats' last_seq is not their last acked seq")
    return {
        "acked": acked,
        "stored": stored,
        "checked_present": in_files - not_stored,
        "checked_content": sampled - content_wrong,
        "problems": problems,
    }


def sync(chats: int, per_chat: int) -> dict[str, Any]:
    def body(t: Target, ids: list[str], chat_ids: list[str]) -> dict[str, Any]:
        return run_loadgen(
            t.plan("sync", tokens=[t.token[ids[1]]], expected=dict.fromkeys(chat_ids, per_chat))
        )

    return with_target("pychat", 2, [[0, 1]] * 0 + [[0, 1] for _ in range(chats)], per_chat, body)


SIZES = {
    "quick": {
        "idle": 2000,
        # Each user in 5 groups of 10 with 3 messages each, synced before memory is read.
        "idle_synced": (5, 10, 3),
        "fanout": (200, 2000),
        "latency": (100, 2000.0, 3.0, 0, ()),
        "persist": (16, 3.0, 1),
        "sync": (20, 100),
        "floor": (500, 1.0),
    },
    "full": {
        "idle": 19000,
        "idle_synced": (5, 10, 3),
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
    # `floor` runs with `latency` (at its rates) or alone.
    ap.add_argument("--only", default="idle,fanout,latency,persist,sync")
    args = ap.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    only = set(args.only.split(","))
    results: dict[str, Any] = {"size": "quick" if args.quick else "full"}
    if "idle" in only:
        results["idle"] = {
            "pychat": idle("pychat", size["idle"], 3.0),
            # The same size for both (the ratio compares like with like).
            "baseline": idle("naive", size["idle"], 3.0),
            # No baseline here: the naive server keeps no messages to sync.
            "pychat_with_chats_synced": idle("pychat", size["idle"], 3.0, *size["idle_synced"]),
        }
    if "fanout" in only:
        r, m = size["fanout"]
        results["fanout"] = {"pychat": fanout("pychat", r, m), "baseline": fanout("naive", r, m)}
    if "latency" in only:
        g, rate, secs, idle_n, sweep = size["latency"]
        results["latency"] = {
            "pychat": latency("pychat", g, rate, secs, idle_n, sweep),
            "baseline": latency("naive", min(g, 100), 2000.0, secs, 0),
        }
        if not args.quick:
            # The baseline's own shape (100 groups, 2,000 msg/s, no idle), for a like-for-like ratio.
            results["latency"]["pychat_at_baseline"] = latency("pychat", min(g, 100), 2000.0, secs, 0)
    if "latency" in only or "floor" in only:
        _, rate, _, _, sweep = size["latency"]
        results["floor"] = floor((*sweep, rate), *size["floor"])
    if "persist" in only:
        results["persist"] = {"pychat": persist(*size["persist"])}
    if "sync" in only:
        results["sync"] = {"pychat": sync(*size["sync"])}
    path = record("suite", results, measured_code())
    print(summary(results))
    plot(results, path.with_suffix(".png"))
    failed = failures(results)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        raise SystemExit(1)


def failures(r: dict[str, Any]) -> list[str]:
    """Every run of the results that lost, duplicated or reordered a message, or failed a check."""
    out = []

    def walk(where: str, x: Any) -> None:
        if isinstance(x, dict):
            bad = {k: x[k] for k in ("lost", "duplicated", "out_of_order", "errors") if x.get(k)}
            if bad:
                out.append(f"{where}: {bad}")
            for k, v in x.items():
                walk(f"{where}.{k}" if where else k, v)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(f"{where}[{i}]", v)

    walk("", r)
    return out


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"| scenario | pychat | naive baseline | ratio | lost / dup / out-of-order / errors ({r['size']}) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def errs(x: dict[str, Any]) -> str:
        return f"{x.get('lost', 0)} / {x.get('duplicated', 0)} / {x.get('out_of_order', 0)} / {x.get('errors', 0)}"

    if "idle" in r:
        p, b = r["idle"]["pychat"], r["idle"]["baseline"]
        lines.append(
            f"| idle: bytes per connection ({p['connected']} held) | {p['bytes_per_connection']} | {b['bytes_per_connection']} | {b['bytes_per_connection'] / max(p['bytes_per_connection'], 1):.1f}x less | - |"
        )
        if "pychat_with_chats_synced" in r["idle"]:
            x = r["idle"]["pychat_with_chats_synced"]
            lines.append(
                f"| idle with chats + synced: bytes per connection ({x['connected']} held, each user in "
                f"{x['groups_per_user']} groups of {x['group_size']} with {x['messages_per_chat']} messages each; "
                f"{x['synced']} synced, {x['synced_messages']:,} messages in {x['sync_s']:.2f} s) | "
                f"{x['bytes_per_connection']} | - | - | {errs(x)} |"
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
    for x in r.get("floor", {}).get("runs", []):
        w = x["write_to_read"]
        lines.append(
            f"| floor, no server: loopback TCP alone at {x['rate']:,.0f} frames/s (= {x['messages_per_s']:.0f} msg/s x {FRAMES_PER_MESSAGE}), "
            f"{x['pairs']} connections, {x['writers']} writer threads: write -> read p50 / p99 / p99.9 ms; cores busy; CPU per frame | "
            f"{w['p50_ms']} / {w['p99_ms']} / {w['p999_ms']}; {x['cores_busy']:.2f} cores; {x['cpu_us_per_delivery']:.1f} us "
            f"({x['cpu_system_s'] / max(x['cpu_user_s'] + x['cpu_system_s'], 1e-9):.0%} kernel) | - | - | {errs(x)} |"
        )
    if "persist" in r:
        p = r["persist"]["pychat"]
        lines.append(
            f"| persist: acked durable msgs/s (batch {p['mean_batch_events']}; median of {len(p['runs_acked_per_s'])}: {', '.join(f'{x:,}' for x in p['runs_acked_per_s'])}) | {p['acked_per_s']:,.0f} | - | - | {errs(p)} |"
        )
        v = p.get("verify")
        if v:
            lines.append(
                f"| persist, checked: acks in seq order per chat; store read back: {v['stored']:,} rows for {v['acked']:,} acks, "
                f"{v['checked_present']:,} acks found (message_id, client_msg_id, sender), {v['checked_content']:,} sampled contents match | "
                f"{'ok' if not v['problems'] else 'FAILED: ' + '; '.join(v['problems'])} | - | - | {errs(p)} |"
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
    """Three panels: pychat against the baseline for each comparable figure (baseline = 1);
    latency against the message rate, with the floor's p99; bytes per idle connection (plain,
    with chats + synced, and the baseline's)."""
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
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 5), width_ratios=(3, 3, 2))
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
        ax2.set_title(f"Latency, {p['groups']} groups, {p['idle']} idle connections")
    floor_runs = sorted(r.get("floor", {}).get("runs", []), key=lambda x: x["messages_per_s"])
    if floor_runs:
        ax2.plot(
            [x["messages_per_s"] for x in floor_runs],
            [x["write_to_read"]["p99_ms"] for x in floor_runs],
            marker="x",
            linestyle="--",
            color="#777",
            label="p99 of loopback TCP alone (write -> read)",
        )
    if "latency" in r or floor_runs:
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("messages/s (open loop)")
        ax2.set_ylabel("send -> receive, ms")
        # Below the axes: inside, it hid the floor's points at low rates.
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")
    if "idle" in r:
        memory = [("pychat", r["idle"]["pychat"], "#3b7dd8")]
        if "pychat_with_chats_synced" in r["idle"]:
            memory.append(("pychat, with\nchats + synced", r["idle"]["pychat_with_chats_synced"], "#2f5fa8"))
        memory.append(("naive\nbaseline", r["idle"]["baseline"], "#999"))
        ax3.bar(
            [n for n, _, _ in memory],
            [x["bytes_per_connection"] for _, x, _ in memory],
            color=[c for _, _, c in memory],
        )
        for i, (_, x, _) in enumerate(memory):
            ax3.annotate(
                f"{x['bytes_per_connection']:,}", (i, x["bytes_per_connection"]), ha="center", va="bottom"
            )
        ax3.set_ylabel("server bytes per idle connection")
        ax3.set_title(f"Idle memory ({r['idle']['pychat']['connected']:,} held)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path.resolve().relative_to(ROOT)}")


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
