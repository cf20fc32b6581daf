"""Python-side parsers and small state machines under hypothesis: bad input is
refused with the protocol's errors, never with a crash. `make fuzz` raises the
example count (HYPOTHESIS_PROFILE=fuzz)."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pychat.auth import TokenIssuer, hash_password, verify_password
from pychat.client import _ChatCursor
from pychat.config import load_config
from pychat.errors import ApiError
from pychat.ratelimit import RateLimiter
from pychat.rest import Request

SETTINGS = [
    "PORT",
    "WS_PORT",
    "HEARTBEAT_S",
    "DATA_DIR",
    "SQLITE_SYNCHRONOUS",
    "LIMITS_MAX_CONTENT_BYTES",
    "HOST",
    "NOPE",
]


@given(
    st.dictionaries(st.sampled_from(SETTINGS).map(lambda k: f"PYCHAT_{k}"), st.text(max_size=12), max_size=5)
)
def test_configuration_from_any_environment_is_a_config_or_a_value_error(env: dict[str, str]) -> None:
    try:
        config = load_config(None, env=env)
    except ValueError:
        return
    assert isinstance(config.port, int) and config.sqlite_synchronous.upper() in ("FULL", "NORMAL", "EXTRA")


def _request(query: dict[str, str] | None = None, body: bytes = b"") -> Request:
    return Request(method="GET", path="/", query=query or {}, headers={}, body=body)


@given(st.text(max_size=30), st.integers(0, 1000), st.integers(0, 10**6))
def test_integer_query_parameters_are_in_bounds_or_bad_request(raw: str, lo: int, span: int) -> None:
    hi = lo + span
    try:
        value = _request({"n": raw}).int_query("n", lo, hi)
    except ApiError as e:
        assert (e.code, e.status) == ("bad_request", 400)
        return
    assert value is None or (lo <= value <= hi and int(raw) == value)


@given(st.binary(max_size=200))
def test_request_bodies_are_objects_or_bad_request(body: bytes) -> None:
    try:
        value = _request(body=body).json()
    except ApiError as e:
        assert e.code == "bad_request"
        return
    assert isinstance(value, dict)


@given(st.text(max_size=200))
def test_any_stored_hash_string_verifies_false_without_raising(stored: str) -> None:
    assume(not stored.startswith("scrypt$16384"))
    assert verify_password("password", stored) is False


def test_a_real_hash_verifies_and_a_mangled_one_does_not() -> None:
    h = hash_password("correct horse")
    assert verify_password("correct horse", h)
    assert not verify_password("correct horse", h[:-4] + "AAAA")
    assert not verify_password("wrong horse", h)


@given(st.text(alphabet=string.printable, max_size=120))
def test_any_string_as_a_token_is_unauthorized_or_a_user(token: str) -> None:
    issuer = TokenIssuer(b"0123456789abcdef0123", 60)
    try:
        user = issuer.user_of(token)
    except ApiError as e:
        assert (e.code, e.status) == ("unauthorized", 401)
        return
    pytest.fail(f"a random string was accepted as a token of {user!r}")


@given(st.lists(st.integers(1, 40), max_size=120))
def test_client_cursor_counts_each_seq_once_and_tracks_the_gap_free_prefix(seqs: list[int]) -> None:
    cursor = _ChatCursor()
    fresh = [cursor.see(s) for s in seqs]
    assert sum(fresh) == len(set(seqs))
    prefix = 0
    while prefix + 1 in set(seqs):
        prefix += 1
    assert cursor.contiguous == prefix


@given(
    st.floats(0.5, 100),
    st.integers(1, 20),
    st.lists(st.floats(0, 0.5), min_size=1, max_size=60),
)
@example(
    rate=1.0, burst=1, gaps=[0.0, 0.01, 0.0]
)  # found by hypothesis: float rounding made retry_after too short
def test_rate_limiter_never_allows_more_than_burst_plus_refill(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate, burst)
    now = 0.0
    for allowed, gap in enumerate(gaps, start=1):
        now += gap
        retry = limiter.check("k", now)
        if retry is not None:
            assert retry >= 1
            now += retry / 1000  # waiting as told is enough
            assert limiter.check("k", now) is None
        assert allowed <= burst + rate * now + 1e-6
