"""The wheel as a user gets it (`make test-wheel`): installed with pip into a fresh virtualenv
outside the checkout, with no extra.

Checks that the SDK imports without the server's heavy dependencies, that a missing extra is
one line naming its `pip install`, and that `pychat serve` (started from a folder outside the
checkout) passes a smoke test through the public protocol: register, log in, open a chat, send
over the WebSocket, read the history, and load the web page, the docs page and the contract.

    python -m tests.wheel_check dist/pychat-0.1.0-cp311-abi3-*.whl
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from services.process import free_port

# Modules the client SDK must not pull in.
HEAVY = ("PIL", "pyarrow", "pychat._core", "granian", "cassandra", "confluent_kafka", "boto3")


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def must(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        raise SystemExit(f"wheel check: {what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def install(wheel: Path, venv: Path) -> Path:
    must(run([sys.executable, "-m", "venv", str(venv)]), "creating a virtualenv")
    python = venv / "bin" / "python"
    started = time.monotonic()
    must(
        run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)]),
        f"pip install {wheel.name}",
    )
    print(
        f"wheel check: installed {wheel.name} into a fresh virtualenv in {time.monotonic() - started:.1f} s"
    )
    return python


def check_sdk_alone(python: Path, home: Path) -> None:
    script = f"import sys, pychat.client; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = must(run([str(python), "-c", script], cwd=home), "import pychat.client").strip()
    if loaded:
        raise SystemExit(f"wheel check: `import pychat.client` loaded {loaded}")
    print("wheel check: import pychat.client loads none of " + ", ".join(HEAVY))


def check_missing_extra(pychat: Path, home: Path) -> None:
    done = run(
        [str(pychat), "serve", "--data-dir", str(home / "x"), "--store", "cassandra://127.0.0.1:1/none"],
        cwd=home,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    if done.returncode != 2 or len(lines) != 1 or "pip install 'pychat[cassandra]'" not in lines[0]:
        raise SystemExit(
            f"wheel check: a missing extra should be one line naming its install:\n{done.stderr}"
        )
    print(f"wheel check: a missing extra says: {lines[0]}")


async def smoke(url: str, ws_url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        ids = {}
        for name in ("alice", "bob"):
            r = await http.post("/api/users", json={"username": name, "password": "correct horse"})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["user_id"]
        r = await http.post("/api/auth/token", json={"username": "alice", "password": "correct horse"})
        token = r.json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        r = await http.post("/api/chats", json={"kind": "direct", "members": [ids["bob"]]}, headers=auth)
        assert r.status_code == 201, r.text
        chat_id = r.json()["chat_id"]
        async with connect(f"{ws_url}?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            send = {"type": "send", "chat_id": chat_id, "client_msg_id": "w1", "content": "from a wheel"}
            await ws.send(json.dumps(send))
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "ack":
                pass
        r = await http.get(f"/api/chats/{chat_id}/messages", headers=auth)
        assert [m["content"] for m in r.json()["messages"]] == ["from a wheel"], r.text
        pages = {}
        for path in ("/", "/docs", "/app.js", "/api/openapi.json", "/api/ws-frames.schema.json"):
            r = await http.get(path)
            assert r.status_code == 200 and r.content, (path, r.status_code)
            pages[path] = len(r.content)
        assert "<html" in (await http.get("/")).text.lower()
        assert "/api/chats" in (await http.get("/api/openapi.json")).json()["paths"]
        print(f"wheel check: register, chat, send over WebSocket ({frame['seq']=}), history; pages {pages}")


def check_serve(pychat: Path, home: Path) -> None:
    port, ws_port = free_port(), free_port()
    log = (home / "serve.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCHAT_")}
    proc = subprocess.Popen(
        [
            str(pychat),
            "serve",
            "--data-dir",
            str(home / "data"),
            "--port",
            str(port),
            "--ws-port",
            str(ws_port),
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "wheel check: pychat serve did not start:\n" + (home / "serve.log").read_text()
                )
            time.sleep(0.2)
        asyncio.run(smoke(url, f"ws://127.0.0.1:{ws_port}/ws"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("wheel check: pychat serve did not stop within 30 s of SIGTERM") from None
        log.close()


def main() -> None:
    wheels = [Path(a) for a in sys.argv[1:]]
    if len(wheels) != 1 or not wheels[0].is_file():
        raise SystemExit(
            f"usage: python -m tests.wheel_check dist/pychat-*.whl (one wheel; got {sys.argv[1:]})"
        )
    with tempfile.TemporaryDirectory(prefix="pychat-wheel-") as tmp:
        home = Path(tmp)
        python = install(wheels[0].resolve(), home / "venv")
        check_sdk_alone(python, home)
        check_missing_extra(home / "venv" / "bin" / "pychat", home)
        check_serve(home / "venv" / "bin" / "pychat", home)
    print("wheel check: passed")


if __name__ == "__main__":
    main()
