"""Search (issue 15) on SQLite, measured on this machine.

- persist: `--messages` messages in many languages appended through the store (what the engine
  calls, batches of 1,000), with the search index off, then with it on (its indexer thread
  following the store in a process of its own, as in a server), each on a fresh database, same run;
  and how long the index took to catch up after the last batch.
- search: a user who is a member of 100 chats (of 2,000) searches words and phrases of every
  language of the corpus; p50 / p99 of `SearchIndex.search` plus reading the user's chats from the
  store (what one REST call does besides HTTP).

    .venv/bin/python benchmarks/search_bench.py            # 1,000,000 messages
    .venv/bin/python benchmarks/search_bench.py --quick    # 100,000

Writes benchmarks/results/search-<time>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pychat.store as store_module  # noqa: E402
from benchmarks.results import imported_code, record  # noqa: E402
from benchmarks.store_bench import percentile  # noqa: E402
from pychat.search import SearchIndex  # noqa: E402
from pychat.search.worker import Indexer  # noqa: E402
from pychat.store import Chat, SendRequest, Store, User, open_store  # noqa: E402

# Words per language: the corpus draws sentences from them, the queries too.
LANGUAGES = {
    "en": [
        "meeting",
        "budget",
        "deploy",
        "release",
        "customer",
        "invoice",
        "weather",
        "lunch",
        "tomorrow",
        "report",
        "design",
        "review",
    ],
    "fr": [
        "réunion",
        "budget",
        "déploiement",
        "café",
        "crème",
        "été",
        "hôtel",
        "élève",
        "forêt",
        "fenêtre",
        "demain",
        "rapport",
    ],
    "de": [
        "Besprechung",
        "Größe",
        "Straße",
        "Bücher",
        "Übung",
        "prüfen",
        "morgen",
        "Bericht",
        "Kunde",
        "Rechnung",
        "Wetter",
    ],
    "ru": [
        "встреча",
        "бюджет",
        "выпуск",
        "клиент",
        "счёт",
        "погода",
        "обед",
        "завтра",
        "отчёт",
        "дизайн",
        "обзор",
    ],
    "zh": ["我们", "明天", "北京", "开会", "预算", "客户", "发票", "天气", "午饭", "报告", "设计", "评审"],
    "ja": ["東京", "明日", "会議", "予算", "天気", "昼ご飯", "報告書", "設計", "確認", "お客様", "請求書"],
    "ko": ["서울", "내일", "회의", "예산", "날씨", "점심", "보고서", "디자인", "검토", "고객", "청구서"],
}
SPACED = {"en", "fr", "de", "ru", "ko"}
USERS = 1_000
CHATS = 2_000
PER_CHAT = 10
MEMBER_OF = 100
BATCH = 1_000


def sentence(rng: random.Random) -> str:
    lang = rng.choice(list(LANGUAGES))
    words = rng.choices(LANGUAGES[lang], k=rng.randint(4, 12))
    sep = " " if lang in SPACED else ""
    return sep.join(words) + f" #{rng.randint(0, 99_999)}"


def setup(store: Store) -> tuple[str, dict[str, list[str]]]:
    """Users and chats; user 0 is in the first MEMBER_OF chats."""
    rng = random.Random(1)
    users = [f"u{i:04d}" for i in range(USERS)]
    for u in users:
        store.create_user(User(u, u, None, "hash", 1))
    members: dict[str, list[str]] = {}
    for c in range(CHATS):
        who = rng.sample(users[1:], PER_CHAT - 1)
        who = [users[0], *who] if c < MEMBER_OF else [*who, rng.choice(users[1:])]
        chat_id = f"c{c:04d}"
        store.create_chat(Chat(chat_id, "group", None, who[0], 1, 0, list(dict.fromkeys(who))), None)
        members[chat_id] = list(dict.fromkeys(who))
    return users[0], members


def batches(members: dict[str, list[str]], messages: int) -> list[list[SendRequest]]:
    rng = random.Random(2)
    chats = list(members)
    out = []
    for start in range(0, messages, BATCH):
        out.append(
            [
                SendRequest(rng.choice(members[c]), c, f"k{start + i:09d}", sentence(rng), [])
                for i, c in enumerate(rng.choices(chats, k=min(BATCH, messages - start)))
            ]
        )
    return out


def persist(store: Store, plan: list[list[SendRequest]], index: Indexer | None) -> dict[str, Any]:
    started = time.perf_counter()
    for sends in plan:
        results, _ = store.append_batch(sends, [])
        if index is not None:
            heads: dict[str, int] = {}
            for s, r in zip(sends, results, strict=True):
                seq = getattr(r, "seq", 0)
                if seq > heads.get(s.chat_id, 0):
                    heads[s.chat_id] = seq
            index.notify(heads)
    elapsed = time.perf_counter() - started
    n = sum(len(b) for b in plan)
    out: dict[str, Any] = {"messages": n, "seconds": round(elapsed, 2), "msgs_per_s": round(n / elapsed)}
    return out


def catch_up(index: SearchIndex, store: Store) -> float:
    """Seconds until the index has every message of the store."""
    started = time.perf_counter()
    heads = dict(store.chat_heads())
    while True:
        cursors = dict(index._conn().execute("SELECT chat_id, seq FROM cursors"))
        if all(cursors.get(c, 0) >= seq for c, seq in heads.items()):
            return round(time.perf_counter() - started, 2)
        time.sleep(0.2)


def queries(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        lang = rng.choice(list(LANGUAGES))
        words = LANGUAGES[lang]
        kind = rng.random()
        if kind < 0.6:
            out.append(rng.choice(words))
        elif kind < 0.8:
            out.append(" ".join(rng.sample(words, 2)))
        else:
            sep = " " if lang in SPACED else ""
            out.append('"' + sep.join(rng.sample(words, 2)) + '"')
    return out


def searches(store: Store, index: SearchIndex, user: str, n: int) -> dict[str, Any]:
    rng = random.Random(3)
    times, hits = [], []
    for q in queries(rng, n):
        started = time.perf_counter()
        chats = [c for c, _, _ in store.sync_chats(user, {})]
        results, _ = index.search(q, chats, limit=50)
        times.append((time.perf_counter() - started) * 1000)
        hits.append(len(results))
    return {
        "queries": n,
        "member_of_chats": MEMBER_OF,
        "p50_ms": round(percentile(times, 0.5), 2),
        "p99_ms": round(percentile(times, 0.99), 2),
        "max_ms": round(max(times), 2),
        "mean_results": round(statistics.mean(hits), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1_000)
    args = p.parse_args()
    if args.quick:
        args.messages, args.queries = 100_000, 300
    results: dict[str, Any] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        off_store = open_store(f"sqlite:///{tmp}/off.db", Path(tmp))
        _, members = setup(off_store)
        plan = batches(members, args.messages)
        results["persist_index_off"] = persist(off_store, plan, None)
        off_store.close()
        on_dir = Path(tmp) / "on"
        on_dir.mkdir()
        on_store = open_store("", on_dir)
        user, _ = setup(on_store)
        # As in a server: queries here, the indexer in its own process following the store.
        index = SearchIndex(on_dir / "search.db", on_store)
        indexer = Indexer("", on_dir)
        indexer.start()
        results["persist_index_on"] = persist(on_store, plan, indexer)
        results["persist_index_on"]["index_catch_up_s"] = catch_up(index, on_store)
        off_rate = results["persist_index_off"]["msgs_per_s"]
        on_rate = results["persist_index_on"]["msgs_per_s"]
        results["indexing_cost"] = round(1 - on_rate / off_rate, 3)
        results["index_bytes"] = (on_dir / "search.db").stat().st_size
        results["search"] = searches(on_store, index, user, args.queries)
        indexer.stop()
        on_store.close()
    record("search", results, imported_code(store_module))


if __name__ == "__main__":
    main()
