"""`after_store`: stored messages handed to a plugin from a durable cursor, at least once.

One feed per plugin with the hook, on a thread of its own. It keeps, in the store, the last seq
of each chat the hook has returned for (`hook_cursors`); it is told which chats moved (by the
engine after each batch, or on a cluster by the sequencers' word) and, at start and every
`RESCAN_S`, compares the store's chat heads with its cursors. It reads each moved chat from its
cursor to its end, hands the hook up to `HOOK_BATCH` messages at a time, and moves the cursors
only after the hook returned. A hook that fails is called again with the same messages after a
pause that grows to `MAX_BACKOFF_S`: a crash, a kill or a failing hook may repeat messages,
never skip one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from pychat.heads import PendingHeads
from pychat.plugins.host import HookFailed, LoadedPlugin, PluginHost
from pychat.store import Store, message_object

log = logging.getLogger("pychat.plugins")

HOOK_BATCH = 500
# The cursor key that says a plugin's after_store has started on this store (not a chat).
STARTED = "#started"
RESCAN_S = 30.0
MAX_BACKOFF_S = 30.0


class AfterStoreFeed:
    def __init__(
        self,
        host: PluginHost,
        plugin: LoadedPlugin,
        store: Store,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.host = host
        self.plugin = plugin
        self.store = store
        # On a cluster, whether this node is the one that feeds the deployment's plugins now.
        self.active = active
        self._pending = PendingHeads()
        self._cursors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pychat-feed-{plugin.spec.name}", daemon=True)

    def start(self) -> None:
        """Before the server takes messages: a plugin new to this store is marked started, at
        the chats' current heads (`replay = true`: from the first message instead)."""
        name = self.plugin.spec.name
        if STARTED not in self.store.hook_cursors(name):
            heads = {} if self.plugin.spec.replay else dict(self.store.chat_heads())
            self.store.move_hook_cursors(name, {**heads, STARTED: 1})
            if heads:
                log.info(
                    "plugin %s: after_store starts after the %d chats' current messages", name, len(heads)
                )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pending.wake.set()
        # A hook call in progress may take its whole budget: its cursors move after it.
        self._thread.join(self.plugin.spec.after_store_budget_ms / 1000 + 5)

    def notify(self, heads: dict[str, int]) -> None:
        self._pending.add(heads)

    def _rescan(self) -> None:
        self._cursors = self.store.hook_cursors(self.plugin.spec.name)
        self.notify({c: head for c, head in self.store.chat_heads() if head > self._cursors.get(c, 0)})

    def _run(self) -> None:
        backoff = 0.0
        next_scan = 0.0
        while not self._stop.is_set():
            if not self.active():
                next_scan = 0.0  # read the cursors again when this node takes over
                self._stop.wait(1.0)
                continue
            try:
                if time.monotonic() >= next_scan:
                    self._rescan()
                    next_scan = time.monotonic() + RESCAN_S
                self._pending.wake.wait(1.0)
                self._pending.wake.clear()
                self._feed()
                backoff = 0.0
            except Exception as e:
                if not isinstance(e, HookFailed):
                    log.exception(
                        "the after_store feed of plugin %s failed; trying again", self.plugin.spec.name
                    )
                backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                self._stop.wait(backoff)

    def _feed(self) -> None:
        """Hands every moved chat's new messages to the hook, a batch at a time."""
        pending = self._pending.take()
        heads = dict(pending)
        later: dict[str, int] = {}  # chats whose next rows are not all visible yet
        try:
            while pending and not self._stop.is_set() and self.active():
                batch: list[dict[str, object]] = []
                moved: dict[str, int] = {}
                for chat_id in list(pending):
                    want = HOOK_BATCH - len(batch)
                    after = self._cursors.get(chat_id, 0)
                    read = self.store.chained_after(chat_id, after, want)
                    # Only rows that follow the cursor without a gap (a replica of a network
                    # store may show later rows before earlier ones): never step over one.
                    rows = read[: next((k for k, r in enumerate(read) if r[1] != after + 1 + k), len(read))]
                    batch.extend(message_object(r) for r in rows)
                    if rows:
                        moved[chat_id] = rows[-1][1]
                    if len(rows) < len(read):
                        later[chat_id] = pending.pop(chat_id)
                    elif len(rows) < want:
                        del pending[chat_id]  # read to its end
                    if len(batch) >= HOOK_BATCH:
                        break
                if not batch:
                    return
                self.host.call(
                    self.plugin, "after_store", batch, self.plugin.spec.after_store_budget_ms / 1000
                )
                self.store.move_hook_cursors(self.plugin.spec.name, moved)
                self._cursors.update(moved)
        except BaseException:
            self.notify(heads)  # read again from the cursors next round
            raise
        if later:  # looked at again shortly (a replica catching up takes milliseconds)
            timer = threading.Timer(0.5, self.notify, [later])
            timer.daemon = True
            timer.start()


# The cursor of an event hook, beside the per-chat ones in `plugin_cursors`.
EVENT_HOOKS = {"on_receipt": ("receipt", "#receipts"), "on_chat_event": ("chat", "#chat_events")}
EVENT_BATCH = 500
EVENT_POLL_S = 0.2


class EventFeed:
    """`on_receipt` / `on_chat_event`: the store's event outbox (written with the receipt or the
    membership change it records, only while such a plugin is loaded), handed to the hook in
    order of position, at least once. The durable cursor is a position at or below which the hook
    has had every event. On SQLite positions are commit order, so the cursor follows the last
    event. On Cassandra they are the writers' clocks, and a write may land a little after later
    ones: the feed also remembers the ids it handed over above the cursor, reads a little behind
    the last one each time (`EVENT_OVERLAP`), re-reads everything above the cursor every
    `EVENT_SWEEP_S`, and moves the cursor only to what the store calls settled. After a crash or
    a takeover the events above the cursor come again. Events every feed of their kind has
    taken may be deleted."""

    def __init__(
        self,
        host: PluginHost,
        plugin: LoadedPlugin,
        hook: str,
        store: Store,
        peers: list[EventFeed],
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.host = host
        self.plugin = plugin
        self.hook = hook
        self.kind, self.key = EVENT_HOOKS[hook]
        self.store = store
        self.peers = peers  # every event feed of the server (for deleting what all have taken)
        # On a cluster, whether this node is the one that feeds the deployment's plugins now.
        self.active = active
        self.cursor = 0
        self._loaded = False
        self._handed: dict[str, int] = {}  # id -> position of events handed over above the cursor
        self._high = 0  # the highest position handed over
        self._next_sweep = 0.0
        self._forgotten = 0  # the position up to which events were last deleted
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pychat-events-{plugin.spec.name}-{hook}", daemon=True
        )

    def start(self) -> None:
        """Before the server takes requests: a plugin new to this store starts from what is
        settled now (`replay = true`: from the oldest event kept)."""
        name = self.plugin.spec.name
        if self.key not in self.store.hook_cursors(name):
            start = 0 if self.plugin.spec.replay else self.store.events_settled()
            self.store.move_hook_cursors(name, {self.key: start})
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.plugin.spec.after_store_budget_ms / 1000 + 5)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if not self.active():
                self._loaded = False  # another node may move the cursor meanwhile
                self._stop.wait(1.0)
                continue
            try:
                if not self._loaded:
                    self._load()
                self._feed()  # reads until a page is not full: nothing more now
                backoff = 0.0
                self._stop.wait(EVENT_POLL_S)
            except Exception as e:
                if not isinstance(e, HookFailed):
                    log.exception("the %s feed of plugin %s failed", self.hook, self.plugin.spec.name)
                backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                self._stop.wait(backoff)

    def _load(self) -> None:
        saved = self.store.hook_cursors(self.plugin.spec.name).get(self.key, 0)
        self.cursor = saved
        self._handed.clear()
        self._high = saved
        self._next_sweep = 0.0
        self._loaded = True

    def _feed(self) -> None:
        """Hands over every event not handed over yet."""
        sweep = time.monotonic() >= self._next_sweep
        settled = self.store.events_settled()  # before reading: all at or below it are visible
        start = self.cursor if sweep else max(self.cursor, self._high - self.store.EVENT_OVERLAP)
        while not self._stop.is_set():
            events = self.store.events_after(self.kind, start, EVENT_BATCH)
            # Bodies are decoded only for events not handed over (the overlap re-reads some).
            fresh = [(pos, eid, body) for pos, eid, body in events if eid not in self._handed]
            if fresh:
                self.host.call(
                    self.plugin,
                    self.hook,
                    [json.loads(body) for _, _, body in fresh],
                    self.plugin.spec.after_store_budget_ms / 1000,
                )
                self._handed.update((eid, pos) for pos, eid, _ in fresh)
                self._high = max(self._high, fresh[-1][0])
            if len(events) < EVENT_BATCH:
                break
            start = events[-1][0]  # a page holds all of its last position
        else:
            return
        if sweep:
            # Read from the cursor to the end: everything settled before the reads is handed over.
            self._next_sweep = time.monotonic() + self.store.EVENT_SWEEP_S
            self._settle(settled)

    def _settle(self, cursor: int) -> None:
        """Everything at or below `cursor` has been handed over: record it, forget what every
        feed of this kind has."""
        if cursor > self.cursor:
            self.store.move_hook_cursors(self.plugin.spec.name, {self.key: cursor})
            self.cursor = cursor
            self._handed = {eid: pos for eid, pos in self._handed.items() if pos > cursor}
        taken = min(feed.cursor for feed in self.peers if feed.kind == self.kind)
        if taken > self._forgotten:  # a delete only when every feed of the kind moved on
            self.store.forget_events(self.kind, taken)
            self._forgotten = taken
