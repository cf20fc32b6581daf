"""`pychat export` on a real data directory: Parquet files by chat and day, read back as one
dataset and compared with the store; a second run takes only what is new."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds

from pychat.store import Chat, SendRequest, User, open_store


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pychat", *args], capture_output=True, text=True, timeout=300, check=False
    )


def _fill(data: Path, chat_id: str, start: int, count: int) -> None:
    store = open_store("", data)
    try:
        for u in ("ua", "ub", "uc"):
            if store.user_by_id(u) is None:
                store.create_user(User(u, u, None, "scrypt$x", 1))
        if store.get_chat(chat_id) is None:
            store.create_chat(Chat(chat_id, "group", "t", "ua", 1, 0, ["ua", "ub"]), None)
        sends = [
            SendRequest("ua", chat_id, f"k{i}", f"note {i} — café", []) for i in range(start, start + count)
        ]
        for i in range(0, len(sends), 1_000):
            store.append_batch(sends[i : i + 1_000], [])
    finally:
        store.close()


def _exported(out: Path) -> dict[str, list[int]]:
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    seqs: dict[str, list[int]] = {}
    for row in table.select(["chat_id", "seq"]).to_pylist():
        seqs.setdefault(row["chat_id"], []).append(row["seq"])
    return {c: sorted(s) for c, s in seqs.items()}


def test_export_is_partitioned_complete_and_incremental(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill(data, "c-one", 0, 2_500)
    _fill(data, "c-two", 0, 30)
    done = _cli("export", str(out), "--data-dir", str(data), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["messages"] == 2_530 and summary["chats"] == 2 and summary["files"] >= 2
    assert _exported(out) == {"c-one": list(range(1, 2_501)), "c-two": list(range(1, 31))}
    assert json.loads((out / "_watermark.json").read_text()) == {"c-one": 2_500, "c-two": 30}
    parts = sorted(p.relative_to(out).parts[:2] for p in out.rglob("*.parquet"))
    assert parts[0][0] == "chat=c-one" and parts[0][1].startswith("day=")
    # Nothing new: nothing written. Then only the new messages, in new files.
    again = json.loads(_cli("export", str(out), "--data-dir", str(data), "--quiet").stdout)
    assert again["messages"] == 0 and again["files"] == 0
    _fill(data, "c-two", 30, 12)
    third = json.loads(_cli("export", str(out), "--data-dir", str(data), "--quiet").stdout)
    assert third["messages"] == 12 and third["chats"] == 1
    assert _exported(out)["c-two"] == list(range(1, 43))
    # One chat, or one user's chats, into folders of their own.
    one = tmp_path / "one"
    assert _cli("export", str(one), "--data-dir", str(data), "--chat", "c-two", "--quiet").returncode == 0
    assert list(_exported(one)) == ["c-two"]
    mine = tmp_path / "mine"
    assert _cli("export", str(mine), "--data-dir", str(data), "--user", "ub", "--quiet").returncode == 0
    assert sorted(_exported(mine)) == ["c-one", "c-two"]
    assert _cli("export", str(mine), "--data-dir", str(data), "--user", "nobody").returncode == 2
