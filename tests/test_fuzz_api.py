"""The REST API fuzzed by schemathesis against api/openapi.json on a real server:
no 5xx, and every response matches the documented status codes and schemas.

Bounded here (a fixed seed, a few examples per operation); `make fuzz` runs it
long with fresh seeds (PYCHAT_FUZZ_EXAMPLES, PYCHAT_FUZZ_SEED)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Clients, ServerProcess

# Not REST: the WebSocket upgrade (tested on its own).
NOT_YET = r"^/ws$"


async def test_rest_api_matches_its_openapi_document_under_fuzzing(
    server: ServerProcess, clients: Clients
) -> None:
    user = await clients.user("fuzzer")
    examples = os.environ.get("PYCHAT_FUZZ_EXAMPLES", "10")
    seed = os.environ.get("PYCHAT_FUZZ_SEED", "20261127")
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        str(ROOT / "api" / "openapi.json"),
        "--url",
        server.url,
        "-H",
        f"Authorization: Bearer {user.token}",
        "--max-examples",
        examples,
        "--exclude-path-regex",
        NOT_YET,
        "--checks",
        "all",
        # PROTOCOL.md answers some over-limit input with 413 too_large, which this check does not count as a rejection.
        # ... and refuses some schema-valid input with 416 (a Range past the end of the file) or 400
        # (a generated multipart body without its file part), each documented in openapi.json.
        # ensure_resource_availability takes any 404 after a create for the created resource being
        # gone: adding a generated (unknown) user to a chat just created is a 404 for the user.
        "--exclude-checks",
        "negative_data_rejection,positive_data_acceptance,ensure_resource_availability",
        "--workers",
        "1",
        "--no-color",
    ]
    if seed:
        cmd += ["--seed", seed]
    env = {**os.environ, "NO_COLOR": "1"}
    run = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=900, env=env)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    log = (server.data_dir / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]


async def test_what_the_api_fuzzer_found_stays_fixed(clients: Clients) -> None:
    """Each case here was a schemathesis finding; the fix is kept by this regression test."""
    alice = await clients.user("found")
    # 405 without an Allow header.
    r = await alice.http.request("TRACE", "/api/chats")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    # Over-long fields were 413; they are malformed input: 400.
    group = await alice.create_group("g", [])
    r = await alice.http.post(f"/api/chats/{group['chat_id']}/members", json={"user_id": "x" * 129})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")
    r = await alice.http.post(
        "/api/users", json={"username": "abc", "password": "x" * 8, "display_name": "d" * 129}
    )
    assert r.status_code == 400
    # A seq past 2**53 - 1 is refused as documented, not mistaken for a missing one.
    r = await alice.http.get(f"/api/chats/{group['chat_id']}/messages", params={"before": str(10**21)})
    assert r.status_code == 400
    # A null title is a group without a title.
    r = await alice.http.post("/api/chats", json={"kind": "group", "members": [], "title": None})
    assert r.status_code == 201 and r.json()["title"] is None
