"""`pychat export` on a real data directory: Parquet files by chat and day, read back as one
dataset and compared with the store; a second run takes only what is new."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pychat.chain import genesis, link
from pychat.gateway import Stored
from pychat.ids import now_ms
from pychat.store import Chat, PointerRequest, SendRequest, User, open_store
from services.cassandra import CassandraServer
from tests.storekit import assert_chained

pytestmark = pytest.mark.timeout(600)


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
    marks = json.loads((out / "_watermark.json").read_text())
    assert {c: m["seq"] for c, m in marks.items()} == {"c-one": 2_500, "c-two": 30}
    assert _verified(out)["messages"] == 2_530
    parts = sorted(p.relative_to(out).parts[:2] for p in out.rglob("*.parquet"))
    assert parts[0][0] == "chat=c-one" and parts[0][1].startswith("day=")
    # Nothing new: nothing written. Then only the new messages, in new files.
    again = json.loads(_cli("export", str(out), "--data-dir", str(data), "--quiet").stdout)
    assert again["messages"] == 0 and again["files"] == 0
    _fill(data, "c-two", 30, 12)
    third = json.loads(_cli("export", str(out), "--data-dir", str(data), "--quiet").stdout)
    assert third["messages"] == 12 and third["chats"] == 1
    assert _exported(out)["c-two"] == list(range(1, 43))
    assert _verified(out)["messages"] == 2_542, "an incremental export verifies as one history"
    # One chat, or one user's chats, into folders of their own.
    one = tmp_path / "one"
    assert _cli("export", str(one), "--data-dir", str(data), "--chat", "c-two", "--quiet").returncode == 0
    assert list(_exported(one)) == ["c-two"]
    mine = tmp_path / "mine"
    assert _cli("export", str(mine), "--data-dir", str(data), "--user", "ub", "--quiet").returncode == 0
    assert sorted(_exported(mine)) == ["c-one", "c-two"]
    assert _cli("export", str(mine), "--data-dir", str(data), "--user", "nobody").returncode == 2


def _verified(out: Path, *extra: str) -> dict[str, Any]:
    done = _cli("verify", str(out), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _broken(out: Path, *extra: str) -> list[dict[str, Any]]:
    done = _cli("verify", str(out), *extra)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert not report["ok"] and report["breaks"]
    assert "BROKEN" in done.stderr
    breaks: list[dict[str, Any]] = report["breaks"]
    return breaks


def _tampered(out: Path, to: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Path:
    """A copy of the export whose first part file of chat c-one went through `change`."""
    shutil.copytree(out, to)
    part = sorted((to / "chat=c-one").glob("day=*/part-*.parquet"))[0]
    table = pq.read_table(part)
    rows = change(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    return to


def test_verify_says_where_an_export_was_cut_reordered_or_edited(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill(data, "c-one", 0, 40)
    _fill(data, "c-two", 0, 5)
    assert _cli("export", str(out), "--data-dir", str(data), "--quiet").returncode == 0
    report = _verified(out, "--data-dir", str(data), "--against-store")
    assert report == {"ok": True, "chats": 2, "messages": 45, "breaks": [], "notes": []}

    deleted = _tampered(out, tmp_path / "deleted", lambda rows: rows[:16] + rows[17:])
    assert [(b["chat_id"], b["seq"]) for b in _broken(deleted)] == [("c-one", 17)]
    assert "seq 17 missing" in _broken(deleted)[0]["problem"]

    def swap(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[20], rows[21] = rows[21], rows[20]
        return rows

    reordered = _broken(_tampered(out, tmp_path / "reordered", swap))
    assert [(b["chat_id"], b["seq"]) for b in reordered] == [("c-one", 21), ("c-one", 21)]
    assert "missing" in reordered[0]["problem"] and "out of order" in reordered[1]["problem"]

    def swap_seqs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[20]["seq"], rows[21]["seq"] = rows[21]["seq"], rows[20]["seq"]
        return sorted(rows, key=lambda r: r["seq"])

    renumbered = _broken(_tampered(out, tmp_path / "renumbered", swap_seqs))
    # Each of the two fails its link, and so does the next (its value follows seq 22's real one).
    assert [b["seq"] for b in renumbered] == [21, 22, 23] and all(
        "edited" in b["problem"] for b in renumbered
    )

    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[9]["content"] = rows[9]["content"].replace("note", "n0te")
        return rows

    edited = _broken(_tampered(out, tmp_path / "edited", edit))
    assert [(b["chat_id"], b["seq"]) for b in edited] == [("c-one", 10)] and "edited" in edited[0]["problem"]

    cut = _broken(_tampered(out, tmp_path / "cut", lambda rows: rows[:-1]))
    assert [(b["chat_id"], b["seq"]) for b in cut] == [("c-one", 40)]
    assert "watermark" in cut[0]["problem"]

    # Rewritten whole, chain values and watermark recomputed: consistent on its own, and caught
    # against the store, which keeps the real values.
    def forge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = edit(rows)
        prev = genesis("c-one")
        for r in rows:
            created = int(r["created_at"].timestamp() * 1000)
            prev = link(prev, r["seq"], r["sender_id"], r["content"], created, [])
            r["chain"] = prev
        return rows

    forged = _tampered(out, tmp_path / "forged", forge)
    marks = json.loads((forged / "_watermark.json").read_text())
    last = pq.read_table(sorted((forged / "chat=c-one").glob("day=*/part-*.parquet"))[-1]).to_pylist()[-1]
    marks["c-one"]["chain"] = last["chain"].hex()
    (forged / "_watermark.json").write_text(json.dumps(marks))
    assert _verified(forged)["ok"]
    against = _broken(forged, "--data-dir", str(data), "--against-store")
    assert [(b["chat_id"], b["seq"]) for b in against] == [("c-one", 40)]
    assert "not the store's history" in against[0]["problem"]


def _fill_earlier(data: Path, chat_id: str, count: int, ago_ms: int) -> None:
    """`count` messages in a new chat, stored `ago_ms` before now (as an import writes them)."""
    store = open_store("", data)
    try:
        for u in ("ua", "ub"):
            if store.user_by_id(u) is None:
                store.create_user(User(u, u, None, "scrypt$x", 1))
        store.create_chat(Chat(chat_id, "group", "t", "ua", 1, 0, ["ua", "ub"]), None)
        prev, rows = genesis(chat_id), []
        for seq in range(1, count + 1):
            at = now_ms() - ago_ms + seq
            prev = link(prev, seq, "ua", f"old {seq}", at, [])
            rows.append((chat_id, seq, f"m-{chat_id}-{seq}", "ua", f"old {seq}", "[]", at, f"o{seq}", prev))
        store.restore_messages(chat_id, rows)
    finally:
        store.close()


def test_verify_against_the_store_catches_an_export_cut_short_with_its_watermark_edited(
    tmp_path: Path,
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill_earlier(data, "c-one", 30, ago_ms=3_600_000)  # an hour before the export
    _fill(data, "c-two", 0, 5)  # just before it
    assert _cli("export", str(out), "--data-dir", str(data), "--quiet").returncode == 0
    assert _verified(out, "--data-dir", str(data), "--against-store")["notes"] == []

    # Cut after seq 20, the watermark edited to end there: consistent on its own, chain and all.
    cut = _tampered(out, tmp_path / "cut", lambda rows: rows[:20])
    marks = json.loads((cut / "_watermark.json").read_text())
    last = pq.read_table(sorted((cut / "chat=c-one").glob("day=*/part-*.parquet"))[-1]).to_pylist()[-1]
    assert last["seq"] == 20
    marks["c-one"] |= {"seq": 20, "chain": last["chain"].hex()}
    (cut / "_watermark.json").write_text(json.dumps(marks))
    assert _verified(cut)["ok"]
    # The store had seq 21 to 30 an hour before the export ran: they belong in it.
    against = _broken(cut, "--data-dir", str(data), "--against-store")
    assert [(b["chat_id"], b["seq"]) for b in against] == [("c-one", 21)], against
    assert "cut short" in against[0]["problem"] and "ends at seq 20" in against[0]["problem"]

    # Messages stored since the export are not missing from it; the next run takes them.
    _fill(data, "c-two", 5, 3)
    assert _verified(out, "--data-dir", str(data), "--against-store")["ok"]
    # A watermark without export times (an older pychat): said, not guessed.
    marks = json.loads((cut / "_watermark.json").read_text())
    (cut / "_watermark.json").write_text(
        json.dumps({c: {"seq": m["seq"], "chain": m["chain"]} for c, m in marks.items()})
    )
    older = _verified(cut, "--data-dir", str(data), "--against-store")
    assert any("no export time" in n and "c-one" in n for n in older["notes"]), older


def _snapshot(store_url: str, data: Path) -> dict[str, Any]:
    """Everything an import must carry over, as the store answers it."""
    store = open_store(store_url, data)
    try:
        users = {u: store.user_by_id(u) for u in ("ua", "ub", "uc")}
        chats = {}
        for chat_id in ("c-one", "c-two", "c-direct"):
            chat = store.get_chat(chat_id)
            assert chat is not None
            history, more = store.history(chat_id, None, None, 500)
            assert not more
            chats[chat_id] = (chat.kind, chat.title, sorted(chat.members), history)
        reads = {u: sorted(store.sync_chats(u, {})) for u in ("ua", "ub", "uc")}
        return {"users": users, "chats": chats, "reads": reads}
    finally:
        store.close()


def test_import_restores_an_export_into_an_empty_store_of_either_kind(
    tmp_path: Path, cassandra: CassandraServer
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill(data, "c-one", 0, 300)
    _fill(data, "c-two", 0, 20)
    store = open_store("", data)
    try:
        store.create_chat(Chat("c-direct", "direct", None, "ub", 5, 0, ["ub", "uc"]), "ub|uc")
        store.append_batch([SendRequest("uc", "c-direct", "d1", "hej 👋", [])], [])
        # A member who sent and then left: the sender is still a user of the export.
        store.add_member("c-two", "uc")
        store.append_batch([SendRequest("uc", "c-two", "x1", "bye", [])], [])
        store.remove_member("c-two", "uc")
        store.append_batch(
            [], [PointerRequest("ub", "c-one", "read", 120), PointerRequest("ua", "c-two", "read", 21)]
        )
    finally:
        store.close()
    assert _cli("export", str(out), "--data-dir", str(data), "--quiet").returncode == 0
    assert (out / "_users.jsonl").stat().st_mode & 0o077 == 0, "password hashes are for the owner only"
    original = _snapshot("", data)

    # An export that names a sender it has no record of is refused before anything is written.
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    users = [line for line in (partial / "_users.jsonl").read_text().splitlines() if '"uc"' not in line]
    (partial / "_users.jsonl").write_text("\n".join(users) + "\n")
    done = _cli("import", str(partial), "--data-dir", str(tmp_path / "never"), "--quiet")
    assert done.returncode == 1 and "user uc" in done.stderr, done.stderr

    keyspace = f"cassandra://{cassandra.host}:{cassandra.port}/imp_{uuid.uuid4().hex[:10]}"
    for target, url in ((tmp_path / "restored", ""), (tmp_path / "moved", keyspace)):
        done = _cli("import", str(out), "--data-dir", str(target), "--store", url, "--quiet")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["messages"] == 322
        assert _snapshot(url, target) == original
        # The restored chats go on where they ended, their chains too.
        store = open_store(url, target)
        try:
            sent, _ = store.append_batch([SendRequest("ua", "c-one", "after", "after the import", [])], [])
            assert isinstance(sent[0], Stored) and sent[0].seq == 301
            assert_chained(store.history("c-one", None, None, 500)[0])
            # Ids minted by the other store still find their message (mark-read by id).
            first = original["chats"]["c-two"][3][0]
            assert store.message_by_id(first["message_id"]) == first
        finally:
            store.close()
        again = _cli("import", str(out), "--data-dir", str(target), "--store", url, "--quiet")
        assert again.returncode == 1 and "not empty" in again.stderr

    # A broken export is not imported.
    broken = _tampered(out, tmp_path / "broken", lambda rows: rows[:5] + rows[6:])
    done = _cli("import", str(broken), "--data-dir", str(tmp_path / "never"), "--quiet")
    assert done.returncode == 1 and "does not verify" in done.stderr
    assert not (tmp_path / "never").exists(), "a refused import creates nothing"


def test_a_refused_import_or_a_verify_against_no_store_creates_no_database(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill(data, "c-one", 0, 10)
    assert _cli("export", str(out), "--data-dir", str(data), "--quiet").returncode == 0
    broken = _tampered(out, tmp_path / "broken", lambda rows: rows[:3] + rows[4:])
    for refused, says in (
        (broken, "does not verify"),
        (tmp_path / "no-such-export", "not a folder written by `pychat export`"),
    ):
        target = tmp_path / "target"
        done = _cli("import", str(refused), "--data-dir", str(target), "--quiet")
        assert done.returncode == 1 and says in done.stderr, done.stderr
        assert not (target / "pychat.db").exists() and not target.exists()
        sqlite_url = f"sqlite:///{tmp_path / 'elsewhere' / 'chat.db'}"
        done = _cli("import", str(refused), "--store", sqlite_url, "--quiet")
        assert done.returncode == 1 and not (tmp_path / "elsewhere").exists()
    # A store named wrongly to compare with is said, not made (empty, it would differ everywhere).
    done = _cli("verify", str(out), "--data-dir", str(tmp_path / "typo"), "--against-store")
    assert done.returncode == 2 and "no store to compare with" in done.stderr, done.stderr
    assert not (tmp_path / "typo").exists()
    # Accepted: the target is made, and holds the export.
    done = _cli("import", str(out), "--data-dir", str(tmp_path / "target"), "--quiet")
    assert done.returncode == 0 and json.loads(done.stdout)["messages"] == 10, done.stderr
    assert (tmp_path / "target" / "pychat.db").exists()


def test_a_folder_from_before_chain_values_is_refused_and_reported(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _fill(data, "c-one", 0, 10)
    assert _cli("export", str(out), "--data-dir", str(data), "--quiet").returncode == 0
    part = sorted(out.rglob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).drop_columns(["chain"]), part)
    (out / "_watermark.json").write_text(json.dumps({"c-one": 10}))  # the old format: a bare seq
    breaks = _broken(out)
    assert "no chain values" in breaks[0]["problem"], breaks
    again = _cli("export", str(out), "--data-dir", str(data), "--quiet")
    assert again.returncode == 2 and "without chain values" in again.stderr
