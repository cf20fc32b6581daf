"""The error codes of PROTOCOL.md and the exception that carries them to a client."""

from __future__ import annotations

from typing import Final

# HTTP status for each protocol error code.
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}


class ApiError(Exception):
    """A refused request: answered with `{"error": {"code", "message"}}` and the code's status."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 500)

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}
