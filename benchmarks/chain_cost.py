"""What the per-chat hash chain (issue 15) costs the message path: durable persist on the SQLite
store (`append_batch`, batches of 1,024 sends over 1,000 chats, as the engine hands them over)
with the chain as built, against the same store with the chain value replaced by a constant (no
hashing, the same 32 bytes stored), in alternating rounds of the same run; medians.

    .venv/bin/python benchmarks/chain_cost.py            # 5 rounds of 100,000 messages each way
    .venv/bin/python benchmarks/chain_cost.py --quick    # 2 rounds of 20,000

Writes benchmarks/results/chain_cost-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pychat.store.sqlite as sqlite_module  # noqa: E402
from benchmarks.results import imported_code, record  # noqa: E402
from benchmarks.store_bench import persist, plan, populate  # noqa: E402
from pychat.chain import link_stored  # noqa: E402
from pychat.store import open_store  # noqa: E402

UNCHAINED = bytes(32)


def unchained(
    prev: bytes, seq: int, sender_id: str, content: str, created_at: int, attachments: str
) -> bytes:
    return UNCHAINED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=100_000, help="per round and way")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.messages = 2, 20_000
    # The store module's own name for the function (what `_plan_sends` calls), swapped per round.
    names = vars(sqlite_module)
    runs: dict[str, list[dict[str, Any]]] = {"chained": [], "unchained": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store("", Path(tmp))
        _, members = populate(store, 2_000, 1_000, 8)
        for round_no in range(args.rounds):
            for way in ("unchained", "chained") if round_no % 2 else ("chained", "unchained"):
                names["link_stored"] = link_stored if way == "chained" else unchained
                batches = plan(members, args.messages, 1_024, seed=round_no * 2 + (way == "chained"))
                result = persist(store, batches)
                assert result["errors"] == 0, result
                runs[way].append(result)
        names["link_stored"] = link_stored
        store.close()
    medians = {way: statistics.median(r["msgs_per_s"] for r in rs) for way, rs in runs.items()}
    figures = {
        "settings": vars(args),
        "runs": runs,
        "chained_msgs_per_s": round(medians["chained"]),
        "unchained_msgs_per_s": round(medians["unchained"]),
        "cost": round(1 - medians["chained"] / medians["unchained"], 4),
    }
    print({k: v for k, v in figures.items() if k != "runs"})
    record("chain_cost", figures, imported_code(sqlite_module))


if __name__ == "__main__":
    main()
