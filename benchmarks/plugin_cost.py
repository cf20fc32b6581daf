"""What plugins cost the message path (issue 16): the suite's persist scenario (durable acks per
second from 64 connections through the load generator) and fan-out scenario (one sender, a group
of 1,000) against servers with no plugin, with a no-op `before_send` plugin
(`tests.plugin_examples:NoOp`) and with the shipped word filter (50 words, masking), in
alternating rounds of the same run; medians.

    .venv/bin/python benchmarks/plugin_cost.py            # 3 rounds
    .venv/bin/python benchmarks/plugin_cost.py --quick    # 1 round, smaller

Writes benchmarks/results/plugin_cost-<time>.json.
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

from benchmarks import suite  # noqa: E402
from benchmarks.results import record  # noqa: E402

WORDS = [f"badword{i}" for i in range(49)] + ["darn"]
CASES = {
    "none": "",
    "noop": '[[plugins]]\nuse = "tests.plugin_examples:NoOp"\n',
    "wordfilter": '[[plugins]]\nuse = "wordfilter"\n[plugins.settings]\naction = "mask"\nwords = '
    + "["
    + ", ".join(f'"{w}"' for w in WORDS)
    + "]\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    persist_size, fanout_size = ((16, 3.0, 1), (200, 500)) if args.quick else ((64, 6.0, 1), (1_000, 2_000))
    rounds = 1 if args.quick else args.rounds
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"persist": [], "fanout": []} for c in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
            for case in order:
                config = Path(tmp) / f"{case}.toml"
                config.write_text(CASES[case])
                suite.SERVER_ENV.clear()
                if CASES[case]:
                    suite.SERVER_ENV["PYCHAT_CONFIG"] = str(config)
                p = suite.persist(*persist_size)
                f = suite.fanout("pychat", *fanout_size)
                assert p["errors"] == 0 and p["lost"] == 0, (case, p)
                runs[case]["persist"].append(p)
                runs[case]["fanout"].append(f)
                print(case, round(p["acked_per_s"]), f.get("deliveries_per_s"), flush=True)
    figures: dict[str, Any] = {
        "settings": vars(args),
        "persist_size": persist_size,
        "fanout_size": fanout_size,
    }
    for case, scenarios in runs.items():
        persist = statistics.median(float(p["acked_per_s"]) for p in scenarios["persist"])
        fanout = statistics.median(float(f["deliveries_per_s"]) for f in scenarios["fanout"])
        figures[case] = {
            "persist_acked_per_s": round(persist),
            "persist_runs": [round(float(p["acked_per_s"])) for p in scenarios["persist"]],
            "fanout_deliveries_per_s": round(fanout),
            "fanout_runs": [round(float(f["deliveries_per_s"])) for f in scenarios["fanout"]],
            "mean_batch_events": [p["mean_batch_events"] for p in scenarios["persist"]],
        }
    for case in ("noop", "wordfilter"):
        figures[case]["persist_cost"] = round(
            1 - figures[case]["persist_acked_per_s"] / figures["none"]["persist_acked_per_s"], 4
        )
        figures[case]["fanout_cost"] = round(
            1 - figures[case]["fanout_deliveries_per_s"] / figures["none"]["fanout_deliveries_per_s"], 4
        )
    print({c: {k: v for k, v in figures[c].items() if "cost" in k or k.endswith("_per_s")} for c in CASES})
    record("plugin_cost", figures, suite.measured_code())


if __name__ == "__main__":
    main()
