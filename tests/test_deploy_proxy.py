"""deploy/nginx/ for real: Debian's nginx (services/nginx.py) runs the example files, changed only
for ports, paths and a self-signed certificate, in front of a real `pychat serve` configured with
deploy/pychat.toml (changed for its host name); a smoke test then goes through it over TLS on one
origin: REST, the web page, /docs, and the SDK's WebSocket over wss (`make test-deploy`)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pychat.client import ChatClient
from pychat.config import Limits
from services import apt
from services.process import die_with_parent, free_port, port_is_open, tail
from tests.conftest import ROOT, ServerProcess, unique_name

NGINX_DIR = ROOT / "deploy" / "nginx"
START_TIMEOUT = 30.0


def replaced(path: Path, replacements: dict[str, str]) -> str:
    """`path`'s text with each string replaced; a string the file no longer has fails the test
    (the example changed under the test's feet: update both together)."""
    text = path.read_text()
    for old, new in replacements.items():
        assert old in text, f"{path.relative_to(ROOT)} no longer has {old!r}: update {Path(__file__).name}"
        text = text.replace(old, new)
    return text


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (openssl's command line)."""
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    command += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl could not make a certificate:\n{done.stderr}"
    return cert, key


@dataclass
class Proxy:
    port: int
    http_port: int
    directory: Path
    cert: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    def trusting(self) -> ssl.SSLContext:
        """What a client that trusts this proxy's certificate verifies it with."""
        return ssl.create_default_context(cafile=str(self.cert))

    def log_tail(self) -> str:
        out = "".join(tail(self.directory / "output.log", 30))
        err = "".join(tail(self.directory / "logs" / "error.log", 30))
        return f"nginx output:\n{out}\nnginx error.log:\n{err}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: workers exit with the master
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def nginx_files(
    directory: Path, port: int, http_port: int, rest_port: int, ws_port: int, cert: Path, key: Path
) -> None:
    """The example files as the test runs them: the same directives, on the test's ports and paths."""
    conf_d = directory / "conf.d"
    for sub in ("conf.d", "logs", "tmp"):
        (directory / sub).mkdir()
    (directory / "nginx.conf").write_text(
        replaced(
            NGINX_DIR / "nginx.conf",
            {
                "/run/nginx.pid": str(directory / "nginx.pid"),
                "/var/log/nginx/": f"{directory / 'logs'}/",
                "/var/lib/nginx/": f"{directory / 'tmp'}/",
                "/etc/nginx/conf.d/": f"{conf_d}/",
            },
        )
    )
    (conf_d / "pychat.conf").write_text(
        replaced(
            NGINX_DIR / "pychat.conf",
            {
                "listen 80;": f"listen 127.0.0.1:{http_port};",
                "    listen [::]:80;\n": "",
                "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
                "    listen [::]:443 ssl http2;\n": "",
                "/etc/ssl/pychat/fullchain.pem": str(cert),
                "/etc/ssl/pychat/privkey.pem": str(key),
            },
        )
    )
    (conf_d / "upstream.conf").write_text(
        replaced(
            NGINX_DIR / "upstream.conf",
            {"127.0.0.1:8080": f"127.0.0.1:{rest_port}", "127.0.0.1:8081": f"127.0.0.1:{ws_port}"},
        )
    )


@pytest.fixture(scope="module")
def nginx() -> Path:
    from services.nginx import install

    return install()  # the pinned Debian package (`make test-deploy` installs it first)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path (mode 0700 all the way up): nginx's workers run as www-data when
    # the test runs as root, and write their temp files under this directory.
    directory = Path(tempfile.mkdtemp(prefix="pychat-deploy-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(workdir: Path, proxy_port: int) -> Iterator[ServerProcess]:
    """pychat on deploy/pychat.toml, its public name made the test proxy's address."""
    config = workdir / "pychat.toml"
    config.write_text(
        replaced(ROOT / "deploy" / "pychat.toml", {"chat.example.com": f"127.0.0.1:{proxy_port}"})
    )
    data_dir = workdir / "data"
    data_dir.mkdir()
    srv = ServerProcess(data_dir, env={"PYCHAT_CONFIG": str(config)}, port=free_port(), ws_port=free_port())
    try:
        srv.start()
    except RuntimeError as e:
        srv.stop()
        pytest.fail(f"pychat did not start: {e}\nlog:\n{''.join(tail(data_dir / 'server.log', 40))}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proxy(nginx: Path, workdir: Path, proxy_port: int, server: ServerProcess) -> Iterator[Proxy]:
    directory = workdir / "nginx"
    directory.mkdir()
    directory.chmod(0o755)
    cert, key = self_signed(directory)
    http_port = free_port()
    nginx_files(directory, proxy_port, http_port, server.port, server.ws_port, cert, key)
    command = [str(nginx), "-p", f"{directory}/", "-c", str(directory / "nginx.conf")]
    command += ["-e", str(directory / "logs" / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"nginx -t refused the example config:\n{checked.stderr}"
    with open(directory / "output.log", "wb") as out:
        proc = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=partial(die_with_parent, ctypes.CDLL(None)),
        )
    running = Proxy(proxy_port, http_port, directory, cert, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while not port_is_open("127.0.0.1", proxy_port):
        if proc.poll() is not None or time.monotonic() > deadline:
            running.stop()
            pytest.fail(f"nginx did not start (exit {proc.poll()}):\n{running.log_tail()}")
        time.sleep(0.05)
    yield running
    running.stop()


async def test_a_smoke_test_through_the_proxy_over_tls(proxy: Proxy) -> None:
    trust = proxy.trusting()
    password = "correct horse battery"
    alice_name, bob_name = unique_name("alice"), unique_name("bob")
    await ChatClient.register(proxy.url, alice_name, password, ssl_context=trust)
    await ChatClient.register(proxy.url, bob_name, password, ssl_context=trust)
    alice = await ChatClient.login(proxy.url, alice_name, password, ssl_context=trust)
    bob = await ChatClient.login(proxy.url, bob_name, password, ssl_context=trust)
    try:
        # The page and the SDK learn the WebSocket's address from the server: the proxy's origin.
        config = await alice.request("GET", "/api/config")
        assert config["ws_url"] == proxy.ws_url
        chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
        hello = await alice.connect()
        await bob.connect()
        assert hello["user_id"] == alice.user_id
        await bob.sync()
        ack = await alice.send(chat_id, "hello through nginx")
        assert ack["type"] == "ack" and ack["seq"] == 1
        msg = await bob.next_event("msg")
        assert (msg["chat_id"], msg["seq"], msg["content"]) == (chat_id, 1, "hello through nginx")
        # A REST send reaches the WebSocket through the proxy too.
        posted = await bob.post_message(chat_id, "and back over REST")
        assert (await alice.next_event("msg"))["seq"] == posted["seq"] == 2
        history = await bob.history(chat_id)
        assert [(m["seq"], m["content"]) for m in history["messages"]] == [
            (1, "hello through nginx"),
            (2, "and back over REST"),
        ]
        # Media both ways: the upload streamed to pychat (request buffering off), the download
        # larger than nginx's memory buffers (spooled through its temp path).
        blob = os.urandom(300_000)
        media = await alice.upload(blob, filename="noise.bin")
        assert await alice.download(media["media_id"]) == blob
    finally:
        await alice.close()
        await bob.close()


def test_the_page_and_the_docs_load_through_the_proxy(proxy: Proxy) -> None:
    with httpx.Client(base_url=proxy.url, verify=proxy.trusting(), timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script type="module" src="/app.js">' in page.text
        script = http.get("/app.js")
        assert script.status_code == 200 and "S.config.ws_url" in script.text
        docs = http.get("/docs")
        assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
        assert http.get("/api/openapi.json").json()["openapi"].startswith("3.1")
        assert http.get("/healthz").json() == {"status": "ok"}
        assert "max-age=" in page.headers["strict-transport-security"]
        # Metrics need no token: the proxy keeps them for scrapers of the node itself.
        assert http.get("/metrics").status_code == 404


def test_the_proxy_speaks_only_tls_and_redirects_http(proxy: Proxy) -> None:
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
        httpx.get(proxy.url, timeout=10)
    plain = httpx.get(f"http://127.0.0.1:{proxy.http_port}/docs", timeout=10)
    assert plain.status_code == 301 and plain.headers["location"].startswith("https://127.0.0.1")


async def test_the_websocket_keeps_the_browser_origin_through_the_proxy(proxy: Proxy) -> None:
    """deploy/pychat.toml allows only the proxy's origin: nginx passes the browser's Origin on."""
    name, password = unique_name("origin"), "correct horse battery"
    await ChatClient.register(proxy.url, name, password, ssl_context=proxy.trusting())
    alice = await ChatClient.login(proxy.url, name, password, ssl_context=proxy.trusting())
    await alice.close()
    url = f"{proxy.ws_url}?token={alice.token}"
    async with connect(url, ssl=proxy.trusting(), origin=proxy.url) as ws:  # type: ignore[arg-type]
        assert '"hello"' in str(await ws.recv())
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, ssl=proxy.trusting(), origin="https://elsewhere.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403


def test_the_upload_limit_matches_pychats() -> None:
    """nginx lets through what pychat accepts (pychat, not nginx, answers over its limit)."""
    size = re.search(r"client_max_body_size (\d+)m;", (NGINX_DIR / "pychat.conf").read_text())
    assert size is not None
    allowed = int(size.group(1)) * 1024 * 1024
    assert Limits().max_upload_bytes <= allowed <= Limits().max_upload_bytes + 1024 * 1024


def test_services_kept_stopped_writes_a_policy_only_where_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(apt, "POLICY_RC_D", policy)
    with apt.services_kept_stopped():
        assert os.access(policy, os.X_OK)
        assert subprocess.run([str(policy), "nginx", "start"], check=False).returncode == 101
    assert not policy.exists()
    policy.write_text("#!/bin/sh\nexit 0\n")
    with apt.services_kept_stopped():
        assert policy.read_text() == "#!/bin/sh\nexit 0\n"  # the machine's own: kept as it is
    assert policy.exists()
