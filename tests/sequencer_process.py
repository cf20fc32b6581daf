"""A sequencer in a process of its own, for tests of a node that dies: it prints each published
result as a JSON line, and with `--die-after-store` it exits (no commit, no leaving the group)
right after the store took its first batch (the first with a stored send), as a node killed
between the two would."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pychat.bus.records import SendRecord
from pychat.cluster.sequencer import Sequencer
from pychat.gateway import Stored
from pychat.store import SendResult, open_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--die-after-store", action="store_true")
    args = ap.parse_args()
    store = open_store(args.store, Path(tempfile.mkdtemp()))

    def publish(results: Sequence[tuple[SendRecord, SendResult]]) -> None:
        for record, result in results:
            line: dict[str, object] = {"key": record.send.client_msg_id, "chat": record.send.chat_id}
            if isinstance(result, Stored):
                line |= {"seq": result.seq, "duplicate": result.duplicate}
            print(json.dumps(line), flush=True)
        # Dies once the store has taken sends (a first batch the store could not take, answered
        # `unavailable` on a loaded machine, is not what this process stands for).
        if args.die_after_store and any(isinstance(result, Stored) for _, result in results):
            os._exit(9)

    sequencer = Sequencer(store, args.bootstrap, args.group, publish, node_id=f"p{os.getpid()}")
    print(json.dumps({"ready": True}), flush=True)
    sequencer.run(threading.Event())


if __name__ == "__main__":
    main()
