"""`make loadtest` as a user meets it: Locust in a virtualenv of its own (never the test one), the
extension rebuilt only when a Rust source is newer than it, results in an untracked folder; and a
short real run that times send -> deliver and counts untimed frames apart from Locust's requests."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCUST = Path(os.environ.get("CACHE", Path.home() / ".cache" / "pychat")) / "venv-loadtest" / "bin" / "locust"

pytestmark = pytest.mark.timeout(300)


def _run_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_run", ROOT / "loadtest" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rust_newer_than_extension() -> bool:
    sos = sorted(ROOT.glob("pychat/_core*.so"), key=lambda p: p.stat().st_mtime)
    if not sos:
        return True
    built = sos[-1].stat().st_mtime
    sources = [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "rust-toolchain.toml"]
    sources += [*ROOT.glob("core/**/*.rs"), *ROOT.glob("core/**/Cargo.toml")]
    return any(s.stat().st_mtime > built for s in sources if s.exists())


def test_make_loadtest_keeps_locust_out_of_the_test_venv_and_builds_only_a_stale_extension(
    tmp_path: Path,
) -> None:
    # A dry run: nothing is installed or built (a recursive make is dry too).
    done = subprocess.run(
        ["make", "-n", "loadtest", f"CACHE={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    installs = [line for line in lines if "requirements-loadtest.txt" in line]
    assert installs and all(str(tmp_path / "venv-loadtest") in line for line in installs), installs
    assert f"loadtest/run.py --locust {tmp_path}/venv-loadtest/bin/locust" in done.stdout
    assert "benchmarks/results" not in done.stdout
    builds = any("maturin develop" in line for line in lines)
    assert builds == _rust_newer_than_extension(), done.stdout


def test_the_loadtest_writes_into_an_ignored_folder() -> None:
    out = _run_py().OUT
    assert out == ROOT / "test-results" / "loadtest"
    probe = out.relative_to(ROOT) / "locust-20260101-000000_stats.csv"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"


def test_a_short_locust_run_times_send_to_deliver_and_counts_frames_apart(tmp_path: Path) -> None:
    assert LOCUST.exists(), f"no Locust at {LOCUST} (`make test-py` and `make loadtest` install it)"
    args = [
        "--users",
        "8",
        "--spawn-rate",
        "8",
        "--time",
        "8s",
        "--locust",
        str(LOCUST),
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, "loadtest/run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (summary,) = [p for p in tmp_path.glob("locust-*.json") if not p.name.endswith("_frames.json")]
    figures = json.loads(summary.read_text())
    timed = figures["latency_ms"]
    assert timed["send -> deliver"]["count"] > 0 and timed["send -> deliver"]["failures"] == 0, timed
    assert timed["send -> ack"]["count"] > 0, timed
    frames = figures["frames_counted"]["frames"]
    assert frames["received msg"]["count"] > 0, frames
    # Locust's requests are only what has a response time: no 0 ms rows for frames merely seen.
    (stats,) = tmp_path.glob("locust-*_stats.csv")
    with open(stats, newline="") as f:
        rows = list(csv.DictReader(f))
    assert not [r for r in rows if r["Type"] == "WS recv" or r["Name"] in ("read", "typing")], rows
