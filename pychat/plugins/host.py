"""Loading plugins and calling their hooks within a time budget (see pychat/plugins/__init__.py).

Every call of a hook runs off the calling thread: a plain hook on the plugin's own thread, an
`async def` hook on the host's event loop thread; the caller waits at most the plugin's budget.
A hook that raises, answers something that is not a verdict list, or overruns is counted
(`pychat_plugin_*` in /metrics) and its policy applies; a hook still busy with an earlier call
is not called again (that counts as a timeout), and after `TRIP_AFTER` failures in a row a
plugin is skipped for `TRIP_S` (its policy applied without calling it), so one plugin that hangs
costs the message path at most one budget now and then, never a stall.

When the server stops (`begin_stop`), calls in progress and new ones get at most a grace period;
a send whose plugin has not answered by then is refused `unavailable` (the client retries it
elsewhere or after the restart). Hooks run on daemon threads: one that never returns cannot keep
the process alive once the server has stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pychat.config import CONFIG_DIR
from pychat.gateway import Failed
from pychat.metrics import Metrics
from pychat.plugins import HOOKS, Accept, Connect, Reject, Rewrite, Send, hooks_of
from pychat.store import SendRequest

log = logging.getLogger("pychat.plugins")

ENTRY_POINTS = "pychat.plugins"
# Failures in a row after which a plugin is skipped for a while, and for how long.
TRIP_AFTER = 3
TRIP_S = 10.0
# A send refused by a failing plugin whose policy is `closed` is asked to retry after this.
CLOSED_RETRY_MS = 1_000
# What a send (or connection) gets when its plugins had not answered as the server stopped.
STOPPING = Failed("unavailable", "the server is stopping; retry", CLOSED_RETRY_MS)
# The plugins' close() hooks, all together, when the server stops.
CLOSE_S = 5.0


class PluginError(Exception):
    """A plugin that cannot be loaded or configured: `pychat serve` stops with this message."""


class HookFailed(Exception):
    """A hook raised, answered nonsense or overran its budget (already counted)."""


class ServerStopping(HookFailed):
    """The server is stopping and its grace period is over: the hook's answer is not waited for.
    Its sends are refused `unavailable` whatever the plugin's policy (they are retried)."""


@dataclass
class PluginSpec:
    """One `[[plugins]]` table of the configuration."""

    name: str  # what /metrics and `pychat plugins` call it
    use: str  # a `pychat.plugins` entry point name, or module:Class
    settings: dict[str, Any] = field(default_factory=dict)
    budget_ms: float = 100.0  # before_send
    after_store_budget_ms: float = 10_000.0
    policy: str = "open"  # before_send failing or overrunning: "open" or "closed"
    # A new after_store plugin starts with what is stored from its first start on; `replay`
    # hands it every stored message first.
    replay: bool = False
    # The directory of the configuration file that names it (not a setting: see `resolve`).
    config_dir: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> PluginSpec:
        if not isinstance(raw, dict) or not isinstance(raw.get("use") or raw.get("name"), str):
            raise PluginError(
                f"{where}: a [[plugins]] table needs `use` (an entry point name or module:Class)"
            )
        raw = dict(raw)
        config_dir = raw.pop(CONFIG_DIR, None)
        known = {f.name for f in dataclasses.fields(cls)} - {"config_dir"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PluginError(f"{where}: unknown plugin setting {unknown[0]!r} (its own go in `settings`)")
        use = str(raw.get("use") or raw["name"])
        spec = cls(
            name=str(raw.get("name") or use.rsplit(":", 1)[-1]),
            use=use,
            settings=dict(raw.get("settings") or {}),
            budget_ms=float(raw.get("budget_ms", 100.0)),
            after_store_budget_ms=float(raw.get("after_store_budget_ms", 10_000.0)),
            policy=str(raw.get("policy", "open")),
            replay=bool(raw.get("replay", False)),
            config_dir=str(config_dir) if config_dir else None,
        )
        if spec.policy not in ("open", "closed"):
            raise PluginError(
                f"{where}: plugin {spec.name}: policy is `open` or `closed`, not {spec.policy!r}"
            )
        if spec.budget_ms <= 0 or spec.after_store_budget_ms <= 0:
            raise PluginError(f"{where}: plugin {spec.name}: budgets are positive milliseconds")
        return spec


def plugin_dirs(config_dir: str | None) -> list[Path]:
    """Where a `module:Class` not among the installed packages (sys.path, PYTHONPATH) is looked
    for, in order: the configuration file's directory, then the current directory."""
    dirs = [Path(config_dir)] if config_dir else []
    dirs.append(Path.cwd())
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _find_module(module_name: str, config_dir: str | None) -> str:
    """Puts the directory holding `module_name` on sys.path (at its end, so it never hides an
    installed module) when the installed packages lack it; why it is not found otherwise."""
    top = module_name.partition(".")[0]
    if importlib.util.find_spec(top) is not None:
        return ""
    dirs = plugin_dirs(config_dir)
    for d in dirs:
        if importlib.machinery.PathFinder.find_spec(top, [str(d)]) is not None:
            if str(d) not in sys.path:
                sys.path.append(str(d))
            return ""
    where = [f"the configuration file's directory ({dirs[0]})"] if config_dir else []
    where.append(f"the current directory ({Path.cwd().resolve()})")
    return (
        f"no module {top!r} among the installed packages of {sys.executable} (sys.path, with"
        f" PYTHONPATH), nor in {' or '.join(where)}"
    )


def resolve(use: str, config_dir: str | None = None) -> Any:
    """The plugin class (or factory) a spec names: an entry point, or `module:Class` from the
    installed packages, the configuration file's directory or the current directory."""
    if ":" not in use:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == use]
        if not found:
            raise PluginError(
                f"no plugin named {use!r}: not a `{ENTRY_POINTS}` entry point (or use module:Class)"
            )
        try:
            return found[0].load()
        except Exception as e:
            raise PluginError(f"plugin {use!r} ({found[0].value}) failed to import: {e!r}") from e
    module_name, _, attr = use.partition(":")
    try:
        not_found = _find_module(module_name, config_dir)
    except Exception as e:  # e.g. a parent package that fails to import
        raise PluginError(f"plugin {use!r}: module {module_name!r} failed to import: {e!r}") from e
    if not_found:
        raise PluginError(f"plugin {use!r}: {not_found}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PluginError(f"plugin {use!r}: module {module_name!r} failed to import: {e!r}") from e
    target = getattr(module, attr, None)
    if target is None:
        raise PluginError(f"plugin {use!r}: {module_name} ({module.__file__}) has no {attr!r}")
    return target


# on_connect is called from REST threads (logins) and the engine thread at once: a few workers.
CONNECT_WORKERS = 4


class HookThreads:
    """The worker thread(s) of one hook: a ThreadPoolExecutor whose threads are daemons. Python
    joins a ThreadPoolExecutor's threads at exit, so a hook stuck in `time.sleep(3600)` kept a
    stopped server's process alive; a daemon thread is abandoned instead."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot call a hook after its plugin was shut down")
            while len(self._threads) < self._workers:  # started at the first call, not at load
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            _run(*item)
            del item  # nothing of a finished call kept while waiting for the next

    def shutdown(self) -> None:
        """Calls not started are cancelled; a call in progress is left to finish (or not)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)


def _run(future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as e:
        future.set_exception(e)
    else:
        future.set_result(result)


@dataclass
class HookState:
    """One hook of one plugin: its own worker thread(s) and its own count of failures, so a slow
    after_store never delays that plugin's before_send, nor trips it."""

    executor: HookThreads
    busy: concurrent.futures.Future[Any] | None = None
    failures: int = 0
    skip_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LoadedPlugin:
    spec: PluginSpec
    instance: Any
    hooks: list[str]
    state: dict[str, HookState] = field(default_factory=dict)

    def hook_state(self, hook: str) -> HookState:
        found = self.state.get(hook)
        if found is None:
            workers = CONNECT_WORKERS if hook == "on_connect" else 1
            found = self.state[hook] = HookState(
                HookThreads(workers, f"pychat-plugin-{self.spec.name}-{hook}")
            )
        return found

    def shutdown(self) -> None:
        for state in self.state.values():
            state.executor.shutdown()


def load(specs: list[PluginSpec]) -> list[LoadedPlugin]:
    loaded: list[LoadedPlugin] = []
    names: set[str] = set()
    for spec in specs:
        if spec.name in names:
            raise PluginError(f"two plugins are named {spec.name!r}: give one a `name`")
        names.add(spec.name)
        factory = resolve(spec.use, spec.config_dir)
        try:
            instance = factory(spec.settings)
        except Exception as e:
            raise PluginError(f"plugin {spec.name!r} refused its settings: {e!r}") from e
        hooks = hooks_of(instance)
        if not hooks:
            raise PluginError(f"plugin {spec.name!r} has no hook ({', '.join(HOOKS)})")
        plugin = LoadedPlugin(spec, instance, hooks)
        for hook in [*hooks, "close"]:
            plugin.hook_state(hook)  # made here, once: calls come from several threads
        loaded.append(plugin)
    return loaded


class PluginHost:
    def __init__(
        self, specs: list[PluginSpec], metrics: Metrics, max_content_bytes: int, max_attachments: int
    ) -> None:
        self.metrics = metrics
        self.max_content_bytes = max_content_bytes
        self.max_attachments = max_attachments
        self.plugins = load(specs)
        self.senders = [p for p in self.plugins if "before_send" in p.hooks]
        self.connectors = [p for p in self.plugins if "on_connect" in p.hooks]
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="pychat-plugins", daemon=True
        )
        self._loop_thread.start()
        # Done once the server is stopping and its grace period is over: calls stop waiting.
        self._cut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop_timer: threading.Timer | None = None

    def begin_stop(self, grace_s: float) -> None:
        """The server is stopping: calls in progress and new ones are waited for at most `grace_s`
        more (and their budget); past it they fail with ServerStopping at once."""
        if self._stop_timer is not None:
            return
        self._stop_timer = threading.Timer(grace_s, self._cut_calls)
        self._stop_timer.daemon = True
        self._stop_timer.start()

    def _cut_calls(self) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._cut.set_result(None)

    def close(self, wait_s: float = CLOSE_S) -> None:
        """Calls each plugin's `close()`, all of them within `wait_s` in all, and lets the hooks'
        threads go (one still busy is abandoned: it cannot keep the process alive)."""
        self._cut_calls()
        deadline = time.monotonic() + wait_s
        for p in self.plugins:
            close = getattr(p.instance, "close", None)
            if callable(close):
                with contextlib.suppress(HookFailed):
                    self.call(p, "close", None, max(0.05, deadline - time.monotonic()), force=True)
            p.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(max(0.05, deadline - time.monotonic()))
        if not self._loop_thread.is_alive():
            self._loop.close()

    # calling

    def call(self, p: LoadedPlugin, hook: str, arg: Any, budget_s: float, force: bool = False) -> Any:
        """The hook's answer, or HookFailed (counted, logged once per failure). `force`: call it
        even while the hook cools down (close)."""
        labels = {"plugin": p.spec.name, "hook": hook}
        state = p.hook_state(hook)
        now = time.monotonic()
        if self._cut.done() and not force:
            raise ServerStopping(f"plugin {p.spec.name} was not called: the server is stopping")
        if now < state.skip_until and not force:
            self.metrics.plugin_skipped.inc(1, **labels)
            raise HookFailed(f"plugin {p.spec.name} is skipped after {TRIP_AFTER} failures in a row")
        self.metrics.plugin_calls.inc(1, **labels)
        # One call at a time per single-threaded hook: a call still running means the next one
        # would only queue behind it (on_connect has a few workers and is called concurrently).
        earlier = state.busy
        if hook != "on_connect" and earlier is not None and not earlier.done() and not force:
            self._failed(p, labels, "timeouts", "still busy with an earlier call")
        fn = getattr(p.instance, hook)
        started = time.perf_counter()
        future: concurrent.futures.Future[Any]
        try:
            if inspect.iscoroutinefunction(fn):
                future = asyncio.run_coroutine_threadsafe(fn(arg) if arg is not None else fn(), self._loop)
            else:
                future = state.executor.submit(fn, arg) if arg is not None else state.executor.submit(fn)
        except Exception as e:  # e.g. the executor is shut down
            self._failed(p, labels, "errors", repr(e))
        state.busy = future
        try:
            if force:
                value = future.result(timeout=budget_s)
            else:
                # Woken by the answer, the budget, or the server's stop (its grace period over).
                concurrent.futures.wait([future, self._cut], budget_s, concurrent.futures.FIRST_COMPLETED)
                if not future.done() and self._cut.done():
                    future.cancel()
                    log.warning("plugin %s: %s had not answered when the server stopped", p.spec.name, hook)
                    raise ServerStopping(f"plugin {p.spec.name} did not answer before the server stopped")
                value = future.result(timeout=0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._failed(p, labels, "timeouts", f"overran its budget of {budget_s * 1000:g} ms")
        except ServerStopping:
            raise
        except Exception as e:
            self._failed(p, labels, "errors", repr(e))
        finally:
            self.metrics.plugin_seconds.observe(time.perf_counter() - started, **labels)
        with state.lock:
            state.failures = 0
        return value

    def _failed(self, p: LoadedPlugin, labels: dict[str, str], kind: str, why: str) -> None:
        (self.metrics.plugin_timeouts if kind == "timeouts" else self.metrics.plugin_errors).inc(1, **labels)
        state = p.hook_state(labels["hook"])
        with state.lock:
            state.failures += 1
            tripped = state.failures >= TRIP_AFTER
            if tripped:
                state.skip_until = time.monotonic() + TRIP_S
                state.failures = 0
        if tripped:
            log.error(
                "plugin %s: %s failed %d times in a row; skipped for %g s",
                p.spec.name,
                labels["hook"],
                TRIP_AFTER,
                TRIP_S,
            )
        log.warning("plugin %s: %s %s", p.spec.name, labels["hook"], why)
        raise HookFailed(why)

    # before_send (the engine thread)

    def before_send(self, sends: list[SendRequest]) -> tuple[list[SendRequest], dict[int, Failed]]:
        """The sends as the plugins leave them, and the refused ones' answers by index. A plugin
        sees the engine's own immutable `SendRequest`s (no copy per message); a verdict of None
        costs nothing more."""
        current = list(sends)
        refused: dict[int, Failed] = {}
        alive = list(range(len(sends)))
        for p in self.senders:
            if not alive:
                break
            batch = current if len(alive) == len(current) else [current[i] for i in alive]
            try:
                changes = self._verdicts(p, batch)
            except ServerStopping:
                # Not checked, so not stored, whatever the policy: the clients send them again.
                refused.update(dict.fromkeys(alive, STOPPING))
                alive = []
                continue
            except HookFailed:
                if p.spec.policy == "closed":
                    refused.update(dict.fromkeys(alive, _unchecked(p, "message")))
                    alive = []
                continue
            for k, verdict in changes.items():
                i = alive[k]
                if isinstance(verdict, Reject):
                    refused[i] = Failed(verdict.code, verdict.message)
                else:
                    s = current[i]
                    attachments = s.attachments if verdict.attachments is None else list(verdict.attachments)
                    current[i] = s._replace(content=verdict.content, attachments=attachments)
            if refused:
                alive = [i for i in alive if i not in refused]
        return current, refused

    def _verdicts(self, p: LoadedPlugin, batch: list[Send]) -> dict[int, Reject | Rewrite]:
        """The plugin's verdicts that change something, by position in `batch`."""
        answer = self.call(p, "before_send", batch, p.spec.budget_ms / 1000)
        if answer is None:
            return {}
        labels = {"plugin": p.spec.name, "hook": "before_send"}
        if not isinstance(answer, list) or len(answer) != len(batch):
            self._failed(p, labels, "errors", f"answered {type(answer).__name__}, not one verdict per send")
        changes: dict[int, Reject | Rewrite] = {}
        for k, v in enumerate(answer):
            if v is None or isinstance(v, Accept):
                continue
            if isinstance(v, Rewrite):
                if not self._fits(v):
                    self._failed(p, labels, "errors", "rewrote a message into something it cannot store")
            elif not isinstance(v, Reject):
                self._failed(p, labels, "errors", f"answered {v!r}, not a verdict")
            changes[k] = v
        return changes

    def _fits(self, v: Rewrite) -> bool:
        """A rewrite the store can take: text (valid UTF-8) within the content limit, a list of at
        most `max_attachments` media ids."""
        try:
            size = len(v.content.encode()) if isinstance(v.content, str) else -1
        except UnicodeEncodeError:  # e.g. a lone surrogate
            return False
        attachments = v.attachments
        if attachments is not None and (
            not isinstance(attachments, list | tuple)
            or len(attachments) > self.max_attachments
            or not all(isinstance(a, str) for a in attachments)
        ):
            return False
        return 0 <= size <= self.max_content_bytes

    # on_connect (the engine thread for upgrades, a REST thread for logins)

    def on_connect(self, attempts: list[Connect]) -> tuple[list[Failed | None], set[int]]:
        """None (let in) or the refusal, per attempt (every plugin with the hook must let it in),
        and the attempts let in only because a plugin failed open: a verdict not to keep."""
        out: list[Failed | None] = [None] * len(attempts)
        unsure: set[int] = set()
        for p in self.connectors:
            alive = [i for i, r in enumerate(out) if r is None]
            if not alive:
                break
            labels = {"plugin": p.spec.name, "hook": "on_connect"}
            try:
                answer = self.call(p, "on_connect", [attempts[i] for i in alive], p.spec.budget_ms / 1000)
                if answer is None:
                    continue
                if not isinstance(answer, list) or len(answer) != len(alive):
                    self._failed(
                        p, labels, "errors", f"answered {type(answer).__name__}, not one verdict each"
                    )
                if any(v is not None and not isinstance(v, Accept | Reject) for v in answer):
                    self._failed(p, labels, "errors", "answered something that is not None, Accept or Reject")
            except HookFailed as e:
                if p.spec.policy == "closed" or isinstance(e, ServerStopping):
                    for i in alive:
                        out[i] = STOPPING if isinstance(e, ServerStopping) else _unchecked(p, "connection")
                else:
                    unsure.update(alive)
                continue
            for i, verdict in zip(alive, answer, strict=True):
                if isinstance(verdict, Reject):
                    out[i] = Failed(verdict.code, verdict.message)
        return out, unsure


def _unchecked(p: LoadedPlugin, what: str) -> Failed:
    """What a `closed` plugin that failed answers: try again shortly."""
    return Failed(
        "unavailable", f"the {p.spec.name} plugin could not check this {what}; retry", CLOSED_RETRY_MS
    )
