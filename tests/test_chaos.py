"""A bounded crash-chaos run (3 SIGKILLs); `make chaos` runs 25 and more clients."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos import run_chaos


async def test_nothing_acked_is_lost_or_duplicated_across_sigkills(tmp_path: Path) -> None:
    report = await run_chaos(tmp_path, kills=3, senders=3, readers=2)
    print(json.dumps(report.__dict__))
    report.assert_clean(kills=3)
