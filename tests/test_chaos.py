"""A bounded crash-chaos run (3 SIGKILLs); `make chaos` runs 25 and more clients."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos import run_chaos


async def test_nothing_acked_is_lost_or_duplicated_across_sigkills(tmp_path: Path) -> None:
    report = await run_chaos(tmp_path, kills=3, senders=3, readers=2)
    print(json.dumps(report.__dict__))
    assert report.kills == 3
    assert report.acked == report.sent > 0, "everything sent was acked in the end"
    assert (report.lost, report.duplicated, report.ack_mismatches, report.gaps) == (0, 0, 0, 0)
    assert (report.reader_gaps, report.order_violations) == (0, 0)
    assert report.stored == report.sent
