"""Messages another node stored, delivered to this node's connections (issue 13).

The relay between nodes (`routes.Relay`) is at most once; the store is not. `RemoteDelivery`
hands the gateway each relayed batch (`Gateway.deliver_stored`: one encoding, the order guard,
the same queues and sync stitching as local messages); the gateway answers with the seq gaps it
met, and the missing messages are read from the store and handed over before the rest of their
chat. So a lost relay message is late, never lost, and never delivered out of order. When no
later message follows it, `catch_up` (run once the node's relay listens again after an outage)
reads it.
"""

from __future__ import annotations

from pychat.gateway import Gateway
from pychat.store import BacklogRow, MessageStore

# A gap larger than this is read in pages (a node far behind, e.g. after a long relay outage).
GAP_PAGE = 1000


class RemoteDelivery:
    def __init__(self, gateway: Gateway, store: MessageStore) -> None:
        self.gateway = gateway
        self.store = store
        self.filled = 0  # messages read from the store to fill gaps, for /metrics
        self.caught_up = 0  # ... and by catch_up

    def deliver(self, rows: list[BacklogRow]) -> None:
        """Delivers `rows` (each chat's in seq order); blocks on store reads when there are gaps:
        run it off the event loop."""
        pending = rows
        while pending:
            again: list[BacklogRow] = []
            for chat_id, after, before in self.gateway.deliver_stored(pending):
                missing = self.store.messages_after(chat_id, after, min(before - after - 1, GAP_PAGE))
                if not missing or missing[0][1] != after + 1:
                    # The store does not show the gap's start (a replica behind): this chat's rows
                    # wait for the next relay or the connections' next sync, never loop here.
                    continue
                self.filled += len(missing)
                again += missing
                again += [r for r in pending if r[0] == chat_id and r[1] >= before]
            pending = again

    def catch_up(self) -> None:
        """Hands over what every chat with a member connected here stored past the last seq
        fanned out here (after the relay lost messages); blocks on store reads."""
        for chat_id, last in self.gateway.fanned_out_heads():
            while True:
                rows = self.store.messages_after(chat_id, last, GAP_PAGE)
                if not rows:
                    break
                self.caught_up += len(rows)
                self.deliver(rows)
                if len(rows) < GAP_PAGE:
                    break
                last = rows[-1][1]
