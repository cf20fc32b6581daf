"""A bounded cluster chaos run: three nodes, a random one SIGKILLed and restarted twice while
clients on every node send and read; `make chaos NODES=3` runs more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cassandra import CassandraServer
from tests.chaos import CHAOS_ENV, AnyNode, chaos_against
from tests.nodekit import running_cluster

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(400)]


async def test_nothing_acked_is_lost_or_duplicated_when_random_nodes_die(
    tmp_path: Path, cassandra: CassandraServer
) -> None:
    with running_cluster(tmp_path, cassandra, env=CHAOS_ENV) as nodes:
        report = await chaos_against(AnyNode(nodes.cluster), kills=2, senders=3, readers=2, pause=(1.0, 2.0))
    print(json.dumps(report.__dict__))
    report.assert_clean(kills=2)
