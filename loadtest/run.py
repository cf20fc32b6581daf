"""`make loadtest`: start a local pychat server, run the Locust users headless for
a bounded time, save the CSV statistics under benchmarks/results/ (and `locust-<time>.json`
naming the commit of the server measured), stop the server."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import record, server_code  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--spawn-rate", type=int, default=10)
    ap.add_argument("--time", default="30s")
    ap.add_argument("--locust", default=str(Path(sys.executable).with_name("locust")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        # Every simulated user registers over REST, all from this one address.
        srv = ServerProcess(
            Path(d), env={"PYCHAT_LOG_LEVEL": "warning", "PYCHAT_REGISTER_PER_MIN": "1000000"}
        )
        srv.start()
        assert srv.proc is not None
        measured = server_code(srv.proc.pid)
        try:
            prefix = ROOT / "benchmarks" / "results" / f"locust-{time.strftime('%Y%m%d-%H%M%S')}"
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
            code = subprocess.run(cmd, check=False).returncode
            print(f"stats: {prefix.relative_to(ROOT)}_stats.csv")
            # Beside the CSV: which server it measured, and how.
            record(
                "locust",
                {"args": vars(args), "stats_csv": f"{prefix.relative_to(ROOT)}_stats.csv", "exit_code": code},
                measured,
            )
        finally:
            srv.stop()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
