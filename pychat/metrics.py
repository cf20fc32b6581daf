"""A small Prometheus registry: counters and histograms with labels, text exposition."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable

LabelKey = tuple[tuple[str, str], ...]


def _labels(key: LabelKey, extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in key]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for key, v in sorted(self._values.items()):
                yield f"{self.name}{_labels(key)} {v:g}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: list[float]) -> None:
        self.name, self.help = name, help_text
        self.buckets = sorted(buckets)
        self._counts: dict[LabelKey, list[int]] = {}
        self._sums: dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for key, counts in sorted(self._counts.items()):
                total = 0
                for bound, n in zip([*self.buckets, float("inf")], counts, strict=True):
                    total += n
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    bucket_labels = _labels(key, 'le="' + le + '"')
                    yield f"{self.name}_bucket{bucket_labels} {total}"
                yield f"{self.name}_sum{_labels(key)} {self._sums[key]:g}"
                yield f"{self.name}_count{_labels(key)} {total}"


class Metrics:
    """Everything the engine and REST layer record; the gateway's counters are added at render time."""

    def __init__(self) -> None:
        self.http_requests = Counter("pychat_http_requests_total", "REST requests by route and status")
        self.http_seconds = Histogram(
            "pychat_http_request_seconds", "REST request latency", [0.001, 0.005, 0.02, 0.1, 0.5, 2.0]
        )
        self.batch_size = Histogram(
            "pychat_engine_batch_events", "Events per engine batch", [1, 2, 4, 8, 16, 64, 256, 1024]
        )
        self.store_seconds = Histogram(
            "pychat_store_batch_seconds",
            "Store latency of one batch (one transaction)",
            [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
        )
        self.errors = Counter("pychat_errors_total", "Errors by kind")
        self.messages = Counter("pychat_messages_stored_total", "Messages stored")
        # Plugins (pychat.plugins), by plugin and hook.
        self.plugin_calls = Counter("pychat_plugin_calls_total", "Plugin hook calls")
        self.plugin_errors = Counter(
            "pychat_plugin_errors_total", "Plugin hook calls that raised or answered nonsense"
        )
        self.plugin_timeouts = Counter("pychat_plugin_timeouts_total", "Plugin hook calls past their budget")
        self.plugin_skipped = Counter(
            "pychat_plugin_skipped_total", "Hook calls skipped while a plugin cools down after failures"
        )
        self.plugin_seconds = Histogram(
            "pychat_plugin_seconds",
            "Plugin hook latency (as the caller waited)",
            [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
        )

    def render(self, gateway_counters: list[tuple[str, int]], connections: int) -> str:
        lines: list[str] = []
        for m in (self.http_requests, self.http_seconds, self.batch_size, self.store_seconds):
            lines.extend(m.render())
        for m2 in (
            self.errors,
            self.messages,
            self.plugin_calls,
            self.plugin_errors,
            self.plugin_timeouts,
            self.plugin_skipped,
        ):
            lines.extend(m2.render())
        lines.extend(self.plugin_seconds.render())
        lines.append("# HELP pychat_connections Open WebSocket connections")
        lines.append("# TYPE pychat_connections gauge")
        lines.append(f"pychat_connections {connections}")
        for name, value in gateway_counters:
            metric = f"pychat_gateway_{name}_total"
            lines.append(f"# TYPE {metric} counter")
            lines.append(f"{metric} {value}")
        return "\n".join(lines) + "\n"
