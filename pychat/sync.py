"""Answers to `sync`, streamed in pages off the engine thread.

The engine thread hands each `sync` here and goes on storing batches, so one
returning user never delays anyone's acks. Each answer is a task on the server's
event loop that reads the user's chats and then each chat's backlog a page at a
time (on a small thread pool, each thread with its own SQLite connection), and
hands each page to the gateway only while the connection's queue has room for it:
a user's history is never in memory beyond one page and that queue. The gateway
holds live messages back meanwhile and stitches them after the backlog
(`core/src/outbox.rs`), so no read here needs to be one snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pychat.gateway import Gateway
from pychat.store import BacklogRow, Store

log = logging.getLogger("pychat.sync")

T = TypeVar("T")

# Messages read and handed over at a time.
PAGE_ROWS = 256
# How long an answer waits before handing a page again to a connection whose queue was full
# (doubling up to the second figure while the client stays slow).
FULL_WAIT_S = (0.002, 0.1)


class SyncStreamer:
    def __init__(
        self, gateway: Gateway, store: Store, loop: asyncio.AbstractEventLoop, threads: int = 2
    ) -> None:
        self.gateway = gateway
        self.store = store
        self._loop = loop
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pychat-sync")
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, conn: int, user_id: str, since: dict[str, int], reference: str | None) -> None:
        """Starts answering a connection's `sync` (callable from any thread)."""
        self._loop.call_soon_threadsafe(self._spawn, conn, user_id, since, reference)

    def _spawn(self, conn: int, user_id: str, since: dict[str, int], reference: str | None) -> None:
        task = self._loop.create_task(self._answer(conn, user_id, since, reference))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, read: Callable[..., T], *args: object) -> T:
        return await self._loop.run_in_executor(self._pool, read, *args)

    async def _answer(self, conn: int, user_id: str, since: dict[str, int], reference: str | None) -> None:
        try:
            synced: list[tuple[str, int]] = []
            for chat_id, cursor, last in await self._read(self.store.sync_chats, user_id, since):
                # Only chats with something above the cursor cost a read; each is read to its
                # end as it is now (messages stored meanwhile are held by the gateway or arrive live).
                while last > cursor:
                    rows: list[BacklogRow] = await self._read(
                        self.store.messages_after, chat_id, cursor, PAGE_ROWS
                    )
                    if rows:
                        if not await self._hand(conn, rows):
                            return  # the connection is gone
                        cursor = rows[-1][1]
                        last = max(last, cursor)
                    if len(rows) < PAGE_ROWS:
                        break
                synced.append((chat_id, last))
            self.gateway.sync_end(conn, reference, synced)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sync of %s failed", user_id)
            self.gateway.sync_failed(conn, reference, "unavailable", "sync failed; retry")

    async def _hand(self, conn: int, rows: list[BacklogRow]) -> bool:
        """Hands a page to the connection once its queue has room; False if it closed."""
        wait, longest = FULL_WAIT_S
        while True:
            outcome = self.gateway.sync_rows(conn, rows)
            if outcome == "queued":
                return True
            if outcome == "closed":
                return False
            await asyncio.sleep(wait)
            wait = min(wait * 2, longest)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
