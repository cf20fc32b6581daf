"""The error codes of PROTOCOL.md and the exception that carries them to a client."""

from __future__ import annotations

from typing import Final

from pychat import gateway

# HTTP status for each protocol error code (one table, in the Rust core: `ErrorCode`).
STATUS: Final[dict[str, int]] = dict(gateway.ERROR_STATUS)

# What an `unavailable` answer tells the client to wait when nothing better is known.
UNAVAILABLE_RETRY_MS: Final[int] = gateway.UNAVAILABLE_RETRY_MS


class ApiError(Exception):
    """A refused request: answered with `{"error": {"code", "message"}}` and the code's status.
    `rate_limited` and `unavailable` also say when to try again: `retry_after_ms` in the body
    and `Retry-After` (whole seconds, rounded up, at least 1) in the headers."""

    def __init__(
        self, code: str, message: str, status: int | None = None, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 500)
        if retry_after_ms is None and code == "unavailable":
            retry_after_ms = UNAVAILABLE_RETRY_MS
        self.retry_after_ms = retry_after_ms
        self.extra_headers: list[tuple[str, str]] = []

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            error["retry_after_ms"] = self.retry_after_ms
        return {"error": error}

    def headers(self) -> list[tuple[str, str]]:
        if self.retry_after_ms is None:
            return list(self.extra_headers)
        return [("retry-after", str(max(1, -(-self.retry_after_ms // 1000)))), *self.extra_headers]


class RateLimited(ApiError):
    """429 `rate_limited`, telling the client when to try again (body and Retry-After)."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            "rate_limited", f"too many requests: retry in {retry_after_ms} ms", retry_after_ms=retry_after_ms
        )
