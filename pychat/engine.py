"""The engine: the Python end of the gateway bridge.

One thread blocks in `Gateway.next_batch` with the GIL released; each wake-up
carries a whole batch of requests. The batch is stored in ONE transaction, then
handed back to Rust, whose fan-out thread acks and fans out while this thread
stores the next batch. While this thread commits batch k, Rust gathers batch
k+1, so under load batches grow (group commit).

REST calls enter the same path with a ticket; their asyncio futures are
resolved on the event loop when the batch completes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pychat.errors import ApiError
from pychat.gateway import (
    Acked,
    ConnectEvent,
    Deferred,
    Done,
    Failed,
    Gateway,
    GatewayError,
    PointerEvent,
    PointerMoved,
    PresenceInfo,
    PresenceQuery,
    SeenEvent,
    SendEvent,
    Stored,
    SyncEvent,
)
from pychat.metrics import Metrics
from pychat.plugins import Connect
from pychat.store import PointerRequest, SendRequest, Store
from pychat.sync import SyncStreamer

if TYPE_CHECKING:
    from pychat.cluster.node import ClusterNode
    from pychat.plugins.host import PluginHost
    from pychat.presence.answers import PresenceAnswers

Event = SendEvent | PointerEvent | SyncEvent | SeenEvent | PresenceQuery | ConnectEvent
Result = Stored | PointerMoved | Failed | Done | Deferred | PresenceInfo
# What a REST ticket gets back.
TicketOutcome = Acked | PointerMoved | Failed

log = logging.getLogger("pychat.engine")

# How long a REST caller waits for its batch before giving up with `unavailable`.
TICKET_TIMEOUT_S = 30.0


class Engine:
    def __init__(self, gateway: Gateway, store: Store, metrics: Metrics, batch_max: int = 1024) -> None:
        self.gateway = gateway
        self.store = store
        self.metrics = metrics
        self.batch_max = batch_max
        self._tickets = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[TicketOutcome]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._syncs: SyncStreamer | None = None
        # On a node of a cluster: sends go to the sends log, the chat's sequencer stores them.
        self.cluster: ClusterNode | None = None
        # Told after each batch which chats have new messages, up to which seq (the search index,
        # the plugins' after_store feeds).
        self.on_stored: Callable[[dict[str, int]], None] | None = None
        # The plugins' before_send hooks see each batch's sends before they are stored.
        self.plugins: PluginHost | None = None
        # Answers presence.subscribe off this thread (set by the server before start).
        self.presence_answers: PresenceAnswers | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._syncs = SyncStreamer(self.gateway, self.store, loop)
        self._thread = threading.Thread(target=self._run, name="pychat-engine", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    async def stop_syncs(self) -> None:
        if self._syncs is not None:
            await self._syncs.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                events = self.gateway.next_batch(self.batch_max, 250)
                # REST tickets the gateway's fan-out thread completed (also what wakes an idle wait).
                self._hand_out(self.gateway.take_tickets())
            except Exception:  # keep the thread: a dead engine would stop every ack
                log.exception("taking an engine batch failed")
                time.sleep(0.1)
                continue
            if events is None:
                return  # gateway shut down
            if not events:
                continue
            try:
                results = self.process(events)
            except Exception:
                log.exception("engine batch failed")
                results = [Failed("internal", "internal error")] * len(events)
            try:
                # Acks and fan-out run in Rust while this thread stores the next batch.
                self.gateway.complete_batch(results)
            except Exception:  # keep serving: the batch's senders retry, the store dedupes
                log.exception("completing an engine batch failed")

    def _answer_connects(
        self, connects: list[tuple[int, ConnectEvent]], results: list[Result | None]
    ) -> None:
        """Upgrades waiting for the plugins' `on_connect` (one call for all of the batch's)."""
        if self.plugins is None:
            for i, _ in connects:
                results[i] = Done()
            return
        attempts = [Connect(ev.user_id, ev.address, "websocket", ev.origin) for _, ev in connects]
        verdicts, unsure = self.plugins.on_connect(attempts)
        for k, ((i, _), refused) in enumerate(zip(connects, verdicts, strict=True)):
            # Deferred: let in, but the gateway keeps no verdict (a plugin failed open on it).
            results[i] = refused if refused is not None else Deferred() if k in unsure else Done()

    def _hand_out(self, tickets: list[tuple[int, TicketOutcome]]) -> None:
        if tickets and self._loop is not None:
            self._loop.call_soon_threadsafe(self._resolve, tickets)

    def process(self, events: list[Event]) -> list[Result]:
        """One result per event, in order. Sends and pointer moves share one store batch."""
        self.metrics.batch_size.observe(len(events))
        results: list[Result | None] = [None] * len(events)
        sends: list[tuple[int, SendRequest]] = []
        pointers: list[tuple[int, PointerRequest]] = []
        syncs: list[SyncEvent] = []
        seen: list[tuple[int, tuple[str, int]]] = []
        queries: list[tuple[int, PresenceQuery]] = []
        connects: list[tuple[int, ConnectEvent]] = []
        for i, ev in enumerate(events):
            if isinstance(ev, SendEvent):
                sends.append(
                    (i, SendRequest(ev.sender_id, ev.chat_id, ev.client_msg_id, ev.content, ev.attachments))
                )
            elif isinstance(ev, PointerEvent):
                pointers.append((i, PointerRequest(ev.user_id, ev.chat_id, ev.kind, ev.seq)))
            elif isinstance(ev, SyncEvent):
                syncs.append(ev)
                results[i] = Deferred()
            elif isinstance(ev, SeenEvent):
                seen.append((i, (ev.user_id, ev.at)))
            elif isinstance(ev, ConnectEvent):
                connects.append((i, ev))
            else:
                queries.append((i, ev))
        if connects:
            self._answer_connects(connects, results)
        if sends and self.plugins is not None and self.plugins.senders:
            # One call per plugin for the whole batch (never per message); on a cluster node,
            # before the send is produced (the node that received it checks it).
            changed, refused = self.plugins.before_send([s for _, s in sends])
            for k, failed in refused.items():
                results[sends[k][0]] = failed
            sends = [
                (i, s) for k, ((i, _), s) in enumerate(zip(sends, changed, strict=True)) if k not in refused
            ]
        if sends and self.cluster is not None:
            # Answered later, when the chat's sequencer has stored them (see pychat.cluster.node).
            for (i, _), produced in zip(sends, self.cluster.submit_sends([s for _, s in sends]), strict=True):
                results[i] = produced
            sends = []
        if sends or pointers or seen:
            started = time.perf_counter()
            seen_result: Result = Done()
            try:
                send_results, pointer_results = self.store.append_batch(
                    [s for _, s in sends], [p for _, p in pointers], [x for _, x in seen]
                )
            except Exception:
                # Nothing of it is acked; what did land is found by its keys when retried.
                log.exception("store batch failed; its sends are answered unavailable")
                self.metrics.errors.inc(kind="store_batch")
                failed = Failed("unavailable", "the store failed; retry")
                send_results = [failed] * len(sends)
                pointer_results = [failed] * len(pointers)
                seen_result = failed
            for i, _ in seen:
                results[i] = seen_result
            self.metrics.store_seconds.observe(time.perf_counter() - started)
            stored = 0
            heads: dict[str, int] = {}
            track = self.on_stored is not None  # per-message work only for a listener
            for (i, s), r in zip(sends, send_results, strict=True):
                results[i] = r
                if isinstance(r, Stored):
                    stored += not r.duplicate
                    # A duplicate too: its first answer may have been lost (a store timeout).
                    if track and r.seq > heads.get(s.chat_id, 0):
                        heads[s.chat_id] = r.seq
            for (i, _), pr in zip(pointers, pointer_results, strict=True):
                results[i] = pr
            if stored:
                self.metrics.messages.inc(stored)
            if heads and self.on_stored is not None:
                self.on_stored(heads)
        for i, q in queries:
            # Answered by the presence thread: a lookup's cost grows with the viewer's chats.
            if self.presence_answers is None:
                results[i] = Failed("unavailable", "presence is starting; retry")
            else:
                self.presence_answers.submit(q)
                results[i] = Deferred()
        # Streamed off this thread, page by page (pychat.sync): a big backlog never holds up a batch.
        if syncs and self.cluster is not None:
            # Messages stored from now on are routed here; those stored before, the sync reads.
            self.cluster.route_here(sorted({s.user_id for s in syncs}))
        for sync in syncs:
            assert self._syncs is not None, "start() comes before the first batch"
            self._syncs.start(sync.conn, sync.user_id, sync.since, sync.reference)
        return [r if r is not None else Failed("internal", "no result") for r in results]

    def _resolve(self, tickets: list[tuple[int, TicketOutcome]]) -> None:
        for ticket, outcome in tickets:
            fut = self._waiting.pop(ticket, None)
            if fut is not None and not fut.done():
                fut.set_result(outcome)

    async def _wait(self, ticket: int, fut: asyncio.Future[TicketOutcome]) -> Acked | PointerMoved:
        try:
            outcome = await asyncio.wait_for(fut, TICKET_TIMEOUT_S)
        except TimeoutError:
            raise ApiError("unavailable", "the engine did not answer in time; retry") from None
        finally:
            self._waiting.pop(ticket, None)
        if isinstance(outcome, Failed):
            raise ApiError(outcome.code, outcome.message, retry_after_ms=outcome.retry_after_ms)
        return outcome

    def _new_ticket(self) -> tuple[int, asyncio.Future[TicketOutcome]]:
        assert self._loop is not None
        ticket = next(self._tickets)
        fut: asyncio.Future[TicketOutcome] = self._loop.create_future()
        self._waiting[ticket] = fut
        return ticket, fut

    async def send(
        self, user_id: str, chat_id: str, client_msg_id: str, content: str, attachments: list[str]
    ) -> dict[str, Any]:
        """Sends through the gateway's sequencer and fan-out, exactly like a WebSocket `send`."""
        ticket, fut = self._new_ticket()
        try:
            done = self.gateway.submit_send(ticket, user_id, chat_id, client_msg_id, content, attachments)
        except BaseException as e:
            self._waiting.pop(ticket, None)
            if isinstance(e, GatewayError):
                raise ApiError(str(e.args[0]), str(e.args[1])) from None
            raise
        if done is not None:
            self._waiting.pop(ticket, None)
            ack: Acked | PointerMoved = done
        else:
            ack = await self._wait(ticket, fut)
        assert isinstance(ack, Acked)
        answer: dict[str, Any] = {
            "message_id": ack.message_id,
            "chat_id": chat_id,
            "seq": ack.seq,
            "created_at": ack.created_at,
        }
        if ack.content is not None:
            # A plugin changed the send: the caller shows what was stored, as the `ack` frame says.
            answer["content"] = ack.content
            answer["attachments"] = json.loads(ack.attachments or "[]")
        return answer

    async def move_pointer(self, user_id: str, chat_id: str, kind: str, seq: int) -> tuple[int, int]:
        """Moves a pointer up (never back); returns (delivered_seq, read_seq) after the move."""
        ticket, fut = self._new_ticket()
        try:
            self.gateway.submit_pointer(ticket, user_id, chat_id, kind, seq)
        except BaseException as e:
            self._waiting.pop(ticket, None)
            if isinstance(e, GatewayError):
                raise ApiError(str(e.args[0]), str(e.args[1])) from None
            raise
        moved = await self._wait(ticket, fut)
        assert isinstance(moved, PointerMoved)
        return moved.delivered, moved.read
