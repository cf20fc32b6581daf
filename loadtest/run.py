"""`make loadtest`: start a local pychat server, run the Locust users headless for a bounded
time, stop the server. Everything goes into test-results/loadtest/ (untracked; `--out`):
Locust's CSV statistics, the frames counted apart (`_frames.json`) and `locust-<time>.json` with
the main latencies and the commit of the server measured.

The server runs on this Python (the test virtualenv, with the checkout's extension); Locust
runs from its own virtualenv (`--locust`; `make loadtest` keeps one under ~/.cache/pychat/), so
Locust and gevent never enter the environment the tests run in.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import record, server_code  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

# The rows of Locust's statistics quoted in the summary (the WebSocket user's timings).
TIMED = ("connect", "send -> ack", "send -> deliver", "sync -> synced")
# Where a run writes (untracked: test-results/ is ignored by git).
OUT = ROOT / "test-results" / "loadtest"


def latencies(stats_csv: Path) -> dict[str, dict[str, Any]]:
    """Per timed row of Locust's `_stats.csv` (and the aggregate): count, failures and the
    median, 95th and 99th percentile and maximum in ms."""
    out: dict[str, dict[str, Any]] = {}
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            name = row["Name"]
            if (row["Type"] == "WS" and name in TIMED) or name == "Aggregated":
                out[name] = {
                    "count": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "median_ms": float(row["50%"]),
                    "p95_ms": float(row["95%"]),
                    "p99_ms": float(row["99%"]),
                    "max_ms": round(float(row["Max Response Time"]), 1),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--spawn-rate", type=int, default=10)
    ap.add_argument("--time", default="30s")
    ap.add_argument("--locust", default=str(Path(sys.executable).with_name("locust")))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        # Every simulated user registers over REST, all from this one address.
        srv = ServerProcess(
            Path(d), env={"PYCHAT_LOG_LEVEL": "warning", "PYCHAT_REGISTER_PER_MIN": "1000000"}
        )
        srv.start()
        assert srv.proc is not None
        measured = server_code(srv.proc.pid)
        try:
            prefix = args.out / f"locust-{time.strftime('%Y%m%d-%H%M%S')}"
            frames = Path(f"{prefix}_frames.json")
            cmd = [
                args.locust,
                "-f",
                str(ROOT / "loadtest" / "locustfile.py"),
                "--headless",
                "-u",
                str(args.users),
                "-r",
                str(args.spawn_rate),
                "-t",
                args.time,
                "--host",
                srv.url,
                "--csv",
                str(prefix),
                "--only-summary",
            ]
            env = {**os.environ, "PYCHAT_LOADTEST_FRAMES": str(frames)}
            code = subprocess.run(cmd, check=False, env=env).returncode
            stats = Path(f"{prefix}_stats.csv")
            timed = latencies(stats)
            print("\nWebSocket timings (ms):   count  failures  median     p95     p99")
            for name, t in timed.items():
                print(
                    f"  {name:<20} {t['count']:>8} {t['failures']:>9} {t['median_ms']:>7g} "
                    f"{t['p95_ms']:>7g} {t['p99_ms']:>7g}"
                )
            # Beside the CSV: which server it measured, how, and the figures that matter.
            record(
                "locust",
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "stats_csv": str(stats),
                    "exit_code": code,
                    "latency_ms": timed,
                    "frames_counted": json.loads(frames.read_text()) if frames.exists() else None,
                },
                measured,
                out_dir=args.out,
            )
        finally:
            srv.stop()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
