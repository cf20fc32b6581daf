"""Reads the Autobahn fuzzing client's reports on pychat (`make autobahn`, services/autobahn.py) and
says per group of cases how they went; exits 1 when pychat got a case wrong.

    .venv/bin/python -m tests.autobahn_check [test-results/autobahn]

pychat is not an echo server: it answers a text frame with its own JSON (an error, for what Autobahn
sends), where Autobahn expects the frame back. So the cases are split in two:

- **echo cases** pass only if the server sends back what it was sent. A case's report lists in
  "expected" each outcome it accepts, as the events the client must receive; Autobahn expects a
  message from the server only as the echo of one it sent. A case is an echo case when any of its
  outcomes has a ("message", ...) event: it sent a data message that the server must answer with
  the echo (pychat answers with its own frame, which matches no outcome). 3.2 is one: "echo, then
  fail" (OK) or "fail before answering" (NON-STRICT), never "answer with something else". Also when
  "expected" is empty: only the 9.* cases, which judge by themselves and pass only on receiving
  their message back whole. Their verdicts are shown, but cannot pass; the check still reads their
  pongs and timeouts (events other than messages) and their TCP close.
- **the others** test the WebSocket layer alone (framing, ping/pong, reserved bits and opcodes,
  fragmentation, UTF-8, closing). Each must be OK, NON-STRICT or INFORMATIONAL, unless it is in
  `ALLOWED` below, with the RFC 6455 text that allows pychat's behavior.

A case's verdict is Autobahn's for the events received ("behavior") joined with the one for the
closing handshake ("behaviorClose"): a wrong close code, an unclean close where a clean one is
required, or a close by the wrong endpoint make the case FAILED.

The server's `hello`: pychat sends it first on every connection. services/autobahn.py's client
sets a connection's first message aside when it is that hello (so no case waits for its timers
because of it) and records that it did ("pychatHello"); a case whose first message was anything else
keeps it in "received", where it fails the case, and is listed here.

Every case, echo or not, must also end promptly: the server drops TCP right after the closing
handshake, not when the client gives up waiting ("droppedByMe" after the server's Close,
"wasServerConnectionDropTimeout", "FAILED BY CLIENT"), answers the client's Close in time
("wasCloseHandshakeTimeout"), and, in the cases that are not echo cases, takes at most `SLOW_MS`
beyond the waits the case makes itself ("duration" less its delays, the "CT" rows of its wire log).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGENT = "pychat"
DEFAULT_DIR = Path("test-results") / "autobahn"
VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
COLUMNS = ("OK", "NON-STRICT", "INFO", "UNIMPL", "FAILED")
# (name, first parts of the case ids in the group)
GROUPS = (
    ("1-2 framing, ping/pong", ("1", "2")),
    ("3-4 reserved bits, opcodes", ("3", "4")),
    ("5 fragmentation", ("5",)),
    ("6 UTF-8", ("6",)),
    ("7 close handling", ("7",)),
    ("9 limits/performance", ("9",)),
    ("10 misc", ("10",)),
)
# Cases that are not echo cases and that Autobahn fails, though RFC 6455 allows what pychat does.
ALLOWED = {
    "2.10": "5.5.3: an endpoint MAY answer only the most recent of several pings (10 pings in one read)",
    "2.11": "5.5.3: an endpoint MAY answer only the most recent of several pings (as 2.10, 1-byte chops)",
}
# What a case may take beyond its own delays: it is a few ms on loopback.
SLOW_MS = 500
OP_CLOSE = "8"


@dataclass
class Case:
    id: str
    report: dict[str, Any]

    @property
    def group(self) -> str:
        first = self.id.split(".")[0]
        return next((name for name, parts in GROUPS if first in parts), f"{first} other")

    @property
    def echo(self) -> bool:
        """Whether the case passes only if the server echoes a data message back (module doc)."""
        expected: dict[str, list[list[Any]]] = self.report["expected"]
        return not expected or any(
            any(event[0] == "message" for event in outcome) for outcome in expected.values()
        )

    @property
    def verdict(self) -> str:
        """Autobahn's verdict on the events, made FAILED by a wrong closing handshake."""
        behavior = str(self.report["behavior"])
        close = str(self.report["behaviorClose"])
        if behavior in ("INFORMATIONAL", "UNIMPLEMENTED", "FAILED"):
            return behavior
        # "FAILED BY CLIENT" (the client dropped TCP) is not a verdict on the close: see `problems`.
        if close in ("OK", "INFORMATIONAL", "FAILED BY CLIENT"):
            return behavior
        return "FAILED"

    @property
    def reason(self) -> str:
        r = self.report
        why = [str(r["result"])] if r["behavior"] not in ("OK", "NON-STRICT") else []
        if r["behaviorClose"] not in ("OK", "INFORMATIONAL"):
            why.append(str(r["resultClose"]))
        why.append(f"server's close code {r['remoteCloseCode']}")
        return "; ".join(why)

    @property
    def events_ok(self) -> bool | None:
        """For an echo case: whether the events other than messages (pongs, the case's timeouts) are
        those of one of its outcomes; None when it lists none (9.*)."""

        def without_messages(events: list[list[Any]]) -> list[list[Any]]:
            return [e for e in events if e[0] != "message"]

        expected: dict[str, list[list[Any]]] = self.report["expected"]
        if not expected:
            return None
        received = without_messages(self.report["received"])
        return any(without_messages(o) == received for o in expected.values())

    def problems(self) -> list[str]:
        """What the server did too slowly, in any case (module doc)."""
        r = self.report
        found = []
        if r["wasCloseHandshakeTimeout"]:
            found.append("did not answer the client's Close in time")
        if (
            r["wasServerConnectionDropTimeout"]
            or r["behaviorClose"] == "FAILED BY CLIENT"
            or (r["droppedByMe"] and OP_CLOSE in r["rxFrameStats"])
        ):
            found.append("kept the TCP connection open after the closing handshake (the client dropped it)")
        # An echo case waits for the echo, and an allowed one for what pychat may leave out.
        if not self.echo and self.id not in ALLOWED:
            waits = sum(row[1] for row in r.get("wirelog", []) if row[0] == "CT") * 1000
            if r["duration"] - waits > SLOW_MS:
                found.append(f"took {r['duration']} ms, {r['duration'] - waits:.0f} ms beyond its own waits")
        return found


def load(report_dir: Path) -> list[Case]:
    index = json.loads((report_dir / "index.json").read_text())
    if AGENT not in index:
        raise SystemExit(f"{report_dir / 'index.json'} has no cases of the agent {AGENT!r}")
    cases = [
        Case(case_id, json.loads((report_dir / entry["reportfile"]).read_text()))
        for case_id, entry in index[AGENT].items()
    ]
    return sorted(cases, key=lambda c: [int(part) for part in c.id.split(".")])


def _row(label: str, cases: list[Case], extra: str = "") -> str:
    counts = Counter(c.verdict for c in cases)
    took = sum(c.report["duration"] for c in cases) / 1000
    cells = "".join(f"{counts[v]:>11}" for v in VERDICTS)
    return f"  {label:<28}{len(cases):>6}{cells}{took:>8.1f}{extra}"


def _events(cases: list[Case]) -> str:
    judged = [c.events_ok for c in cases if c.events_ok is not None]
    return f"  {sum(judged)} of {len(judged)}" if judged else "  -"


def report(cases: list[Case]) -> int:
    """Prints the tables and lists; returns the exit status."""
    header = f"  {'group':<28}{'cases':>6}" + "".join(f"{v:>11}" for v in COLUMNS) + f"{'seconds':>8}"
    plain = [c for c in cases if not c.echo]
    echo = [c for c in cases if c.echo]
    print(f"Autobahn fuzzing client against pychat: {len(cases)} cases")
    print(f"\nCases of the WebSocket layer alone ({len(plain)}; each must pass):")
    print(header)
    for name, _ in GROUPS:
        of_group = [c for c in plain if c.group == name]
        if of_group:
            print(_row(name, of_group))
    print(_row("all", plain))
    print(f"\nEcho cases ({len(echo)}; pychat answers with its own frames, so they cannot pass):")
    print(header + "  pongs/timeouts as expected")
    for name, _ in GROUPS:
        of_group = [c for c in echo if c.group == name]
        if of_group:
            print(_row(name, of_group, _events(of_group)))
    print(_row("all", echo, _events(echo)))
    print("  the server's close codes in them:")
    for name, _ in GROUPS:
        codes = Counter(str(c.report["remoteCloseCode"]) for c in echo if c.group == name)
        if codes:
            print(f"  {name:<28}" + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items())))

    failed = [c for c in plain if c.verdict == "FAILED"]
    allowed = [c for c in failed if c.id in ALLOWED]
    failed = [c for c in failed if c.id not in ALLOWED]
    slow = [(c, p) for c in cases for p in c.problems()]
    no_hello = [c for c in cases if not c.report.get("pychatHello")]
    events_wrong = [c for c in echo if c.events_ok is False]
    if allowed:
        print("\nFAILED, but allowed by RFC 6455:")
        for c in allowed:
            print(f"  {c.id}: {ALLOWED[c.id]}")
    if events_wrong:
        print("\nEcho cases whose pongs or timeouts differ (for information):")
        for c in events_wrong:
            print(f"  {c.id}: {c.report['description'].splitlines()[0]}")
    if no_hello:
        print("\nCases whose first message from the server was not pychat's hello:")
        for c in no_hello:
            first = c.report["received"][:1]
            print(f"  {c.id}: {first[0][1] if first else 'no message at all'}")
    if failed:
        print("\nFAILED:")
        for c in failed:
            print(f"  {c.id} ({c.report['description'].splitlines()[0]}): {c.reason}")
    if slow:
        print("\nToo slow:")
        for c, problem in slow:
            print(f"  {c.id}{' (echo case)' if c.echo else ''}: {problem}")
    bad = len(failed) + len(slow)
    print(
        f"\nautobahn check: {len(failed)} FAILED of {len(plain)} cases of the WebSocket layer"
        f" ({len(allowed)} more allowed), {len(slow)} too slow: {'FAILED' if bad else 'passed'}"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.autobahn_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("reports", nargs="?", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    return report(load(args.reports))


if __name__ == "__main__":
    sys.exit(main())
