"""Plugins the tests load into real servers (`use = "tests.plugin_examples:..."`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from pychat.plugins import Connect, Plugin, Reject, Rewrite, Send


class Gatekeeper(Plugin):
    """Rejects messages with "forbidden" in them; `shout: x` is stored as `X` in capitals."""

    def before_send(self, batch: list[Send]) -> list[Reject | Rewrite | None]:
        out: list[Reject | Rewrite | None] = []
        for s in batch:
            if "forbidden" in s.content:
                out.append(Reject("forbidden", "the gatekeeper refused this"))
            elif s.content.startswith("shout: "):
                out.append(Rewrite(s.content.removeprefix("shout: ").upper()))
            else:
                out.append(None)
        return out


class Raiser(Plugin):
    def before_send(self, batch: list[Send]) -> None:
        raise RuntimeError("this plugin always fails")


class Sleeper(Plugin):
    def before_send(self, batch: list[Send]) -> None:
        time.sleep(float(self.settings.get("sleep_s", 1.0)))


class AsyncHang(Plugin):
    """An async before_send that never answers."""

    async def before_send(self, batch: list[Send]) -> None:
        await asyncio.Event().wait()


class AsyncTagger(Plugin):
    """An async hook: appends a tag to every message."""

    async def before_send(self, batch: list[Send]) -> list[Rewrite]:
        return [Rewrite(s.content + " #tagged") for s in batch]


class NoOp(Plugin):
    """Looks at every send and changes nothing (the benchmark's plugin)."""

    def before_send(self, batch: list[Send]) -> None:
        return None


class Bouncer(Plugin):
    """Refuses the users listed in the file `settings["banned"]` (read at each call)."""

    def on_connect(self, attempts: list[Connect]) -> list[Reject | None]:
        path = Path(self.settings["banned"])
        banned = set(path.read_text().split()) if path.exists() else set()
        return [Reject("forbidden", "you are banned here") if a.user_id in banned else None for a in attempts]


class EventLog(Plugin):
    """Appends every receipt and chat event it is handed to the file `settings["path"]`."""

    def _write(self, items: list[dict[str, Any]]) -> None:
        with open(self.settings["path"], "a") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_receipt(self, receipts: list[dict[str, Any]]) -> None:
        self._write(receipts)

    def on_chat_event(self, events: list[dict[str, Any]]) -> None:
        self._write(events)


class Mangler(Plugin):
    """Answers rewrites the store cannot take."""

    def before_send(self, batch: list[Send]) -> list[Rewrite]:
        return [
            Rewrite("\ud800 lone surrogate") if i % 2 else Rewrite("x", attachments=5)
            for i in range(len(batch))
        ]  # type: ignore[arg-type]


class SlowStore(Plugin):
    """after_store takes a second; before_send is instant."""

    def before_send(self, batch: list[Send]) -> None:
        return None

    def after_store(self, messages: list[dict[str, Any]]) -> None:
        time.sleep(1.0)
