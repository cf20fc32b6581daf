"""Passwords (slow salted scrypt hashes) and access tokens (signed, checked by
the Rust gateway without a store round trip)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from pychat.errors import ApiError
from pychat.gateway import TokenError, sign_token, verify_token
from pychat.ids import now_ms

# scrypt cost: about 50 ms and 16 MiB per hash on one core.
_N, _R, _P = 2**14, 8, 1
USERNAME = re.compile(r"[A-Za-z0-9_.-]+")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(base64.b64decode(digest)),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


# Compared against when the username does not exist, so timing does not tell.
DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


class TokenIssuer:
    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self._secret = secret
        self._ttl_ms = ttl_s * 1000

    def issue(self, user_id: str) -> tuple[str, int]:
        expires_at = now_ms() + self._ttl_ms
        return sign_token(self._secret, user_id, expires_at), expires_at

    def user_of(self, token: str) -> str:
        """The token's user id, or ApiError(unauthorized)."""
        try:
            return verify_token(self._secret, token, now_ms())
        except TokenError as e:
            raise ApiError("unauthorized", f"invalid token: {e}") from None
