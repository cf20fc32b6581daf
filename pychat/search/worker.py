"""The search indexer as a process of its own, and the server's handle on it.

    python -m pychat.search.worker --store URL --data-dir DIR [--sqlite-synchronous S]

reads lines of JSON on stdin, each `{chat_id: seq}` (chats with new messages), and indexes them
into `DIR/search.db`; at start it catches up every chat from the store (and every `--rescan-s`
seconds if given: on a cluster node, where the word of which chats moved comes over Redis and
may be lost); it stops at end of input.
In its own process the indexer's Python work (reading rows, folding text) never holds the
server's GIL, and it runs at a lower CPU priority: on a busy box the message path goes first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pychat.heads import PendingHeads
from pychat.search import SearchIndex
from pychat.store import open_store

log = logging.getLogger("pychat.search")

# The indexer's CPU priority below the server's (nice increment).
INDEXER_NICE = 10


class Indexer:
    """The server's side: starts the worker, hands it the chats that moved (never blocking the
    engine: a feeder thread writes them), and starts it again if it dies."""

    def __init__(
        self, store: str, data_dir: Path, sqlite_synchronous: str = "FULL", rescan_s: float = 0
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "pychat.search.worker",
            "--store",
            store,
            "--data-dir",
            str(data_dir),
            "--sqlite-synchronous",
            sqlite_synchronous,
            "--rescan-s",
            str(rescan_s),
        ]
        self.log_path = Path(data_dir) / "indexer.log"
        self._pending = PendingHeads()
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder = threading.Thread(target=self._feed, name="pychat-indexer-feed", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._feeder.start()

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def notify(self, heads: dict[str, int]) -> None:
        """Chats with messages up to these seqs (the engine thread, after a batch): merged and
        handed over by the feeder thread."""
        self._pending.add(heads)

    def _feed(self) -> None:
        while not self._stop.is_set():
            self._pending.wake.wait(1.0)
            self._pending.wake.clear()
            proc = self._proc
            if proc is None or proc.poll() is not None:
                if self._stop.is_set():
                    return
                log.error("the search indexer exited (%s); starting it again", proc and proc.returncode)
                time.sleep(1)
                self._spawn()  # it catches up every chat from the store at start
                continue
            pending = self._pending.take()
            if not pending:
                continue
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(pending, separators=(",", ":")).encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.notify(pending)  # the restarted one catches up anyway

    def stop(self) -> None:
        self._stop.set()
        self._pending.wake.set()
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._feeder.is_alive():
            self._feeder.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pychat.search.worker")
    p.add_argument("--store", default="")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--sqlite-synchronous", default="FULL")
    p.add_argument(
        "--rescan-s", type=float, default=0, help="look for chats that moved unannounced this often"
    )
    args = p.parse_args(argv)
    with contextlib.suppress(OSError):
        os.nice(INDEXER_NICE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(args.store, args.data_dir, args.sqlite_synchronous)
    index = SearchIndex(args.data_dir / "search.db", store, rescan_s=args.rescan_s)
    index.start()
    try:
        for line in sys.stdin.buffer:
            try:
                heads = json.loads(line)
            except ValueError:
                continue
            if isinstance(heads, dict):
                index.notify({str(k): int(v) for k, v in heads.items()})
    finally:
        index.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
