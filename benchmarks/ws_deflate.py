"""permessage-deflate (RFC 7692) for pychat's server frames (issue 24, defect 5): what it would
save on the wire and what it would cost in CPU and memory, measured on the frames a real server
sends. pychat does not implement the extension; this measures whether it would pay.

1. A pychat server (SQLite, temp dir, free ports) and a group of 10 registered users, each on its
   own WebSocket (no extension offered). Every member sends chat texts from a seeded generator of
   English-like words (mostly short replies of 5-40 characters, some sentences of 100-300, a few
   paragraphs of 1-2 KB), some after a `typing` start and with a stop after the ack, and after each
   message the other members move their `delivered` / `read` pointers now and then. Each
   connection keeps the exact text of every frame it receives, in order: `msg`, `ack`, `receipt`,
   `typing`.
2. On those payloads, Python's zlib (the deflate that the Rust side would run through flate2,
   whose backends, zlib-rs or miniz_oxide, differ from C zlib in speed and memory), raw deflate as
   RFC 7692 uses it (windowBits -15, Z_SYNC_FLUSH, the 4-byte 00 00 ff ff tail
   stripped): (a) no context takeover, a fresh compressor per frame; (b) context takeover, one
   compressor per connection over its own stream; compressed bytes, CPU to compress and for a
   client to decompress. (c) Memory per compression context for windowBits 9-15 and memLevel
   1-8, from the RSS growth of a child process holding 10,000 of them (zlib's malloc is not seen
   by tracemalloc), and the ratio each setting gives.
3. The server's own CPU per delivered message in the same run: one sender, a group of 1 and of
   50 receivers on WebSocket, one message in flight at a time; server CPU (utime + stime of the
   server process; the search indexer, a child process, is recorded apart) over deliveries.

    .venv/bin/python benchmarks/ws_deflate.py            # 3,000 messages, 5 trials (about 3 min)
    .venv/bin/python benchmarks/ws_deflate.py --quick    # smaller, 1 trial
    .venv/bin/python benchmarks/ws_deflate.py --save-frames /tmp/frames.json   # keep the frames

Writes benchmarks/results/ws_deflate-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

# The deflate settings of RFC 7692 as zlib takes them: raw deflate (negative windowBits).
LEVEL = 6  # zlib's default (flate2's Compression::default())
WBITS = 15
MEM_LEVEL = 8
TAIL = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with; RFC 7692 7.2.1 strips it

# The memory grid: windowBits (RFC 7692 allows 8-15; zlib's raw deflate takes 9-15) x memLevel.
GRID_WBITS = (15, 12, 11, 10, 9)
GRID_MEM_LEVELS = (8, 4, 2, 1)


# --- (c) Memory per context: measured in a child process of this script, which imports
# nothing of the project (the parent's server, clients and allocations stay out of its RSS) ---


def deflate_fresh(payload: bytes, level: int, wbits: int, mem_level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Holds `n` contexts of one setting, each having compressed (or decompressed) one frame, or
    `warm_bytes` of the stream; RSS growth per context."""
    frames = [f.encode() for f in json.loads(Path(spec["frames"]).read_text())]
    wbits, mem_level, n, kind = spec["wbits"], spec["mem_level"], spec["n"], spec["kind"]
    warm = spec.get("warm_bytes", 0)
    held: list[Any] = []
    inputs: list[bytes] = []
    if kind == "inflate":
        inputs = [deflate_fresh(f, LEVEL, wbits, 8) for f in frames]
    # Allocate and free a few first, so the allocator's own start-up is not counted.
    for i in range(16):
        c = zlib.compressobj(LEVEL, zlib.DEFLATED, -wbits, mem_level)
        c.compress(frames[i]) + c.flush(zlib.Z_SYNC_FLUSH)
    del c
    before = rss_kib()
    at = 0
    for _ in range(n):
        ctx: Any = (
            zlib.decompressobj(-wbits)
            if kind == "inflate"
            else zlib.compressobj(LEVEL, zlib.DEFLATED, -wbits, mem_level)
        )
        fed = 0
        while True:
            frame = frames[at % len(frames)]
            if kind == "inflate":
                # Frames compressed apart continue one stream: each ends on a byte boundary.
                ctx.decompress(inputs[at % len(inputs)] + TAIL)
            else:
                ctx.compress(frame) + ctx.flush(zlib.Z_SYNC_FLUSH)
            at += 1
            fed += len(frame)
            if fed >= warm:
                break
        held.append(ctx)
    after = rss_kib()
    return {"kib_per_context": round((after - before) / n, 2), "rss_kib": [before, after]}


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-child"]:
    print(json.dumps(memory_child(json.loads(sys.argv[2]))))
    raise SystemExit(0)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, record, server_code  # noqa: E402
from benchmarks.suite import UNLIMITED, proc_stats  # noqa: E402
from pychat.client import ChatClient  # noqa: E402
from pychat.ids import new_id  # noqa: E402
from tests.conftest import Clients, ServerProcess  # noqa: E402

# In a group chat, after each message, each other member moves its `delivered` pointer with
# this probability (the web app tells delivered a moment later, so one frame often covers
# several messages) and its `read` pointer with the second.
P_DELIVERED, P_READ = 0.3, 0.15
P_TYPING = 0.4

ENV = {
    **UNLIMITED,
    "PYCHAT_REQUESTS_PER_S": "100000000",
    "PYCHAT_REQUESTS_BURST": "100000000",
    "PYCHAT_REGISTER_PER_MIN": "1000000",
    # Messages here follow each other within milliseconds, not seconds: forward every typing
    # start (the default forwards one per user and chat every 2 s).
    "PYCHAT_TYPING_MIN_INTERVAL_MS": "0",
}

# Common English words, most frequent first (Zipf weights below).
_WORDS = """the be to of and a in that have I it for not on with he as you do at this but his by
from they we say her she or an will my one all would there their what so up out if about who get
which go me when make can like time no just him know take people into year your good some could
them see other than then now look only come its over think also back after use two how our work
first well way even new want because any these give day most us is are was were been has had did
said going really maybe sure thanks ok yes yeah nope lol right today tomorrow tonight later soon
meeting call lunch dinner coffee home office train late early weekend week morning evening plan
idea problem question answer code test build deploy review merge branch issue fix bug release
server client message chat group photo file link doc slides budget report deadline project team
manager customer order price ship box room house car road city trip flight hotel ticket game
movie book music song show news weather rain sun cold hot happy sorry great nice cool awesome
fine busy tired hungry ready done still already again never always often here where why"""
WORDS = _WORDS.split()

SHORT_ENDINGS = ("", "", "", ".", "!", "?", " :)", " 👍", " 😂", "...")


def chat_texts(n: int, seed: int) -> list[str]:
    """`n` chat texts from a seeded generator: 75% short replies (5-40 characters), 20% sentences
    (100-300), 5% paragraphs (1-2 KB); words drawn with Zipf weights from WORDS."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]

    def words(k: int) -> list[str]:
        return rng.choices(WORDS, weights, k=k)

    def sentence() -> str:
        text = " ".join(words(rng.randint(4, 18)))
        if rng.random() < 0.2:
            cut = text.find(" ", len(text) // 2)
            if cut > 0:
                text = text[:cut] + "," + text[cut:]
        return text[0].upper() + text[1:] + rng.choice(".....?!")

    def prose(low: int, high: int) -> str:
        target = rng.randint(low, high)
        out = sentence()
        while len(out) < target:
            out += " " + sentence()
        return out[:high].rstrip()

    texts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.75:
            target = rng.randint(5, 40)
            text = ""
            while len(text) < target - 2:
                text = (text + " " + words(1)[0]).strip()
            text = text[:38].rstrip()
            if rng.random() < 0.4:
                text = text[0].upper() + text[1:]
            texts.append(text + rng.choice(SHORT_ENDINGS))
        elif r < 0.95:
            texts.append(prose(100, 300))
        else:
            texts.append(prose(1024, 2048))
    return texts


# --- 1. Capture: the frames a real server sends ---


@dataclass
class Conn:
    """A member's WebSocket, reading everything the server sends into `frames` (the exact text
    of each frame, in order, once `synced`)."""

    user: ChatClient
    ws: ClientConnection
    frames: list[str] = field(default_factory=list)
    msgs: int = 0
    acks: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    record: bool = True
    task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, ws_url: str, user: ChatClient, record: bool = True) -> Conn:
        # No extension offered: the payloads are what pychat sends today.
        ws = await connect(
            f"{ws_url}?token={user.token}", compression=None, max_size=2**22, ping_interval=None
        )
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        await ws.send(json.dumps({"type": "sync", "since": {}}))
        while json.loads(await ws.recv())["type"] != "synced":
            pass
        conn = cls(user, ws, record=record)
        conn.task = asyncio.create_task(conn._read())
        return conn

    async def _read(self) -> None:
        async for text in self.ws:
            assert isinstance(text, str)
            if self.record:
                self.frames.append(text)
            if text.startswith('{"type":"msg"'):
                self.msgs += 1
            elif text.startswith('{"type":"ack"'):
                self.acks.put_nowait(json.loads(text))
            elif text.startswith('{"type":"error"'):
                raise RuntimeError(f"server error frame: {text}")

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(compact(frame))

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


def compact(frame: dict[str, Any]) -> str:
    """A client frame as a browser's JSON.stringify writes it."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def send_frame(chat_id: str, content: str) -> dict[str, Any]:
    # The SDK's own client_msg_id (time-ordered).
    return {"type": "send", "chat_id": chat_id, "client_msg_id": new_id(""), "content": content}


async def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("frames did not arrive")
        await asyncio.sleep(0.01)


async def capture(srv: ServerProcess, clients: Clients, texts: list[str], seed: int) -> dict[str, Any]:
    """A group of 10 chatting: every connection's received frames, and the send frames."""
    rng = random.Random(seed + 1)
    users = [await clients.user("dfl") for _ in range(10)]
    chat_id = (await users[0].create_group("deflate", [u.user_id for u in users[1:]]))["chat_id"]
    conns = [await Conn.open(srv.ws_url, u) for u in users]
    sends: list[str] = []
    delivered = [0] * len(conns)
    read = [0] * len(conns)
    for text in texts:
        i = rng.randrange(len(conns))
        sender = conns[i]
        typed = rng.random() < P_TYPING
        if typed:
            await sender.send({"type": "typing", "chat_id": chat_id, "state": "start"})
        frame = send_frame(chat_id, text)
        sends.append(compact(frame))
        await sender.ws.send(sends[-1])
        ack = await asyncio.wait_for(sender.acks.get(), 30)
        assert ack["client_msg_id"] == frame["client_msg_id"], ack
        if typed:
            await sender.send({"type": "typing", "chat_id": chat_id, "state": "stop"})
        seq = int(ack["seq"])
        for j, c in enumerate(conns):
            if j == i:
                continue
            if rng.random() < P_DELIVERED and seq > delivered[j]:
                delivered[j] = seq
                await c.send({"type": "delivered", "chat_id": chat_id, "seq": seq})
            if rng.random() < P_READ and seq > read[j]:
                read[j] = seq
                await c.send({"type": "read", "chat_id": chat_id, "seq": seq})
    n = len(texts)
    await wait_for(lambda: sum(c.msgs for c in conns) >= n * (len(conns) - 1))
    await asyncio.sleep(1.0)  # the last receipts and typing stops
    for c in conns:
        await c.close()
    return {"chat_id": chat_id, "streams": [c.frames for c in conns], "sends": sends}


# --- 3. The server's own CPU per delivered message ---


def cpu_with_children(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process, CPU seconds of its children: the search indexer)."""
    own, _ = proc_stats(pid)
    children = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                children += proc_stats(int(child))[0]
    return own, children


async def fanout(
    srv: ServerProcess, clients: Clients, texts: list[str], receivers: int, messages: int, trials: int
) -> dict[str, Any]:
    """One sender, a group of `receivers`, `messages` per trial, one in flight at a time: the
    server's CPU per delivery (and per message: the store, the ack, the fan-out)."""
    assert srv.proc is not None
    sender_user = await clients.user("dfs")
    members = [await clients.user("dfr") for _ in range(receivers)]
    chat_id = (await sender_user.create_group("fanout", [u.user_id for u in members]))["chat_id"]
    sender = await Conn.open(srv.ws_url, sender_user, record=False)
    conns = [await Conn.open(srv.ws_url, u, record=False) for u in members]
    runs = []
    for t in range(trials):
        await asyncio.sleep(0.5)
        before = sum(c.msgs for c in conns)
        cpu0, kids0 = cpu_with_children(srv.proc.pid)
        start = time.perf_counter()
        for k in range(messages):
            await sender.send(send_frame(chat_id, texts[(t * messages + k) % len(texts)]))
            await asyncio.wait_for(sender.acks.get(), 30)

        def arrived(target: int = before + messages * receivers) -> bool:
            return sum(c.msgs for c in conns) >= target

        await wait_for(arrived)
        wall = time.perf_counter() - start
        cpu1, kids1 = cpu_with_children(srv.proc.pid)
        deliveries = sum(c.msgs for c in conns) - before
        assert deliveries == messages * receivers, (deliveries, messages * receivers)
        runs.append(
            {
                "deliveries": deliveries,
                "wall_s": round(wall, 3),
                "server_cpu_s": round(cpu1 - cpu0, 3),
                "indexer_cpu_s": round(kids1 - kids0, 3),
                "server_cpu_us_per_delivery": round((cpu1 - cpu0) / deliveries * 1e6, 3),
                "server_cpu_us_per_message": round((cpu1 - cpu0) / messages * 1e6, 1),
            }
        )
        print("fanout trial", runs[-1], flush=True)
    await sender.close()
    for c in conns:
        await c.close()
    return {
        "receivers": receivers,
        "messages_per_trial": messages,
        "in_flight": 1,
        "runs": runs,
        "server_cpu_us_per_delivery": round(
            statistics.median(r["server_cpu_us_per_delivery"] for r in runs), 3
        ),
        "server_cpu_us_per_message": round(
            statistics.median(r["server_cpu_us_per_message"] for r in runs), 1
        ),
        "indexer_cpu_us_per_message": round(
            statistics.median(r["indexer_cpu_s"] for r in runs) / messages * 1e6, 1
        ),
    }


async def run_server(
    args: argparse.Namespace, texts: list[str]
) -> tuple[dict[str, Any], dict[str, Any], Code]:
    with tempfile.TemporaryDirectory() as d:
        srv = ServerProcess(Path(d), env=ENV)
        srv.start()
        assert srv.proc is not None
        clients = Clients(srv)
        try:
            measured = server_code(srv.proc.pid)
            captured = await capture(srv, clients, texts, args.seed)
            fan = {
                str(n): await fanout(srv, clients, texts, n, args.fanout_messages, args.trials)
                for n in (1, args.receivers)
            }
        finally:
            await clients.close()
            srv.stop()
    return captured, fan, measured


# --- 2. Compression on the captured payloads ---


def header_bytes(n: int) -> int:
    """A server frame's header (unmasked) for an `n`-byte payload (RFC 6455 5.2)."""
    return 2 if n < 126 else 4 if n < 1 << 16 else 10


def kind_of(frame: bytes) -> str:
    """The `type` of a frame (every frame's first field, compact JSON)."""
    assert frame.startswith(b'{"type":"'), frame[:20]
    return frame[9 : frame.index(b'"', 9)].decode()


@dataclass
class Tally:
    """Bytes and CPU of one kind of frame in one trial."""

    frames: int = 0
    raw: int = 0
    compressed: int = 0
    wire_raw: int = 0
    wire_compressed: int = 0
    compress_ns: int = 0
    decompress_ns: int = 0

    def add(self, raw: int, compressed: int, compress_ns: int, decompress_ns: int) -> None:
        self.frames += 1
        self.raw += raw
        self.compressed += compressed
        self.wire_raw += header_bytes(raw) + raw
        self.wire_compressed += header_bytes(compressed) + compressed
        self.compress_ns += compress_ns
        self.decompress_ns += decompress_ns


def no_takeover(
    streams: list[list[bytes]], level: int, wbits: int, mem_level: int, check: bool
) -> dict[str, Tally]:
    """A fresh compressor per frame (and a fresh decompressor on the client)."""
    tallies: dict[str, Tally] = {}
    clock = time.perf_counter_ns
    for stream in streams:
        for frame in stream:
            t0 = clock()
            c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
            out = c.compress(frame) + c.flush(zlib.Z_SYNC_FLUSH)
            out = out[:-4]
            t1 = clock()
            d = zlib.decompressobj(-wbits)
            back = d.decompress(out + TAIL)
            t2 = clock()
            if check:
                assert back == frame
            tallies.setdefault(kind_of(frame), Tally()).add(len(frame), len(out), t1 - t0, t2 - t1)
    return tallies


def takeover(
    streams: list[list[bytes]], level: int, wbits: int, mem_level: int, check: bool
) -> dict[str, Tally]:
    """One compressor per connection over its own stream (and one decompressor on the client)."""
    tallies: dict[str, Tally] = {}
    clock = time.perf_counter_ns
    for stream in streams:
        c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
        d = zlib.decompressobj(-wbits)
        for frame in stream:
            t0 = clock()
            out = c.compress(frame) + c.flush(zlib.Z_SYNC_FLUSH)
            out = out[:-4]
            t1 = clock()
            back = d.decompress(out + TAIL)
            t2 = clock()
            if check:
                assert back == frame
            tallies.setdefault(kind_of(frame), Tally()).add(len(frame), len(out), t1 - t0, t2 - t1)
    return tallies


def summarize(trials: list[dict[str, Tally]], timer_ns: float) -> dict[str, Any]:
    """Per kind of frame and in all: ratio, bytes per frame on the wire, median CPU per frame."""
    kinds = sorted({k for t in trials for k in t})
    out: dict[str, Any] = {}
    for kind in [*kinds, "all"]:
        per_trial = [
            _merge(t.values()) if kind == "all" else t[kind] for t in trials if kind == "all" or kind in t
        ]
        first = per_trial[0]
        out[kind] = {
            "frames": first.frames,
            "payload_bytes_mean": round(first.raw / first.frames, 1),
            "compressed_bytes_mean": round(first.compressed / first.frames, 1),
            "ratio": round(first.raw / first.compressed, 3),
            "wire_bytes_per_frame": round(first.wire_raw / first.frames, 1),
            "wire_bytes_per_frame_compressed": round(first.wire_compressed / first.frames, 1),
            "wire_ratio": round(first.wire_raw / first.wire_compressed, 3),
            "compress_us": round(statistics.median(t.compress_ns / t.frames for t in per_trial) / 1000, 3),
            "decompress_us": round(
                statistics.median(t.decompress_ns / t.frames for t in per_trial) / 1000, 3
            ),
            "compress_us_runs": [round(t.compress_ns / t.frames / 1000, 3) for t in per_trial],
        }
    out["timer_overhead_us"] = round(timer_ns / 1000, 3)
    return out


def _merge(tallies: Iterable[Tally]) -> Tally:
    m = Tally()
    for t in tallies:
        m.frames += t.frames
        m.raw += t.raw
        m.compressed += t.compressed
        m.wire_raw += t.wire_raw
        m.wire_compressed += t.wire_compressed
        m.compress_ns += t.compress_ns
        m.decompress_ns += t.decompress_ns
    return m


def timer_overhead() -> float:
    clock = time.perf_counter_ns
    n = 200_000
    t0 = clock()
    for _ in range(n):
        clock()
    return (clock() - t0) / n


class _ZStream(ctypes.Structure):
    """zlib's z_stream on LP64."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def context_costs(mem_level: int, wbits: int) -> dict[str, float]:
    """What a context costs apart from compressing: creating and freeing one (a fresh
    compressor per message, as Python's zlib must do it), against deflateReset on one kept
    context (what a server would do for no context takeover: one context per worker thread),
    called through ctypes on the same libz, less a null ctypes call."""
    n = 20_000
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        zlib.compressobj(LEVEL, zlib.DEFLATED, -wbits, mem_level)
    create = (clock() - t0) / n
    libz = ctypes.CDLL("libz.so.1")
    z = _ZStream()
    ref = ctypes.byref(z)
    rc = libz.deflateInit2_(
        ref, LEVEL, 8, -wbits, mem_level, 0, zlib.ZLIB_RUNTIME_VERSION.encode(), ctypes.sizeof(z)
    )
    assert rc == 0, rc
    resets = []
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            libz.deflateReset(ref)
        t1 = clock()
        for _ in range(n):
            libz.zlibCompileFlags()
        t2 = clock()
        resets.append(((t1 - t0) - (t2 - t1)) / n)
    libz.deflateEnd(ref)
    return {
        "create_and_free_us": round(create / 1000, 3),
        "reset_us": round(statistics.median(resets) / 1000, 3),
    }


def ratio_of(tallies: dict[str, Tally], kind: str | None = None) -> float:
    t = _merge(tallies.values()) if kind is None else tallies[kind]
    return round(t.raw / t.compressed, 3)


def memory(frames_file: Path, kind: str, wbits: int, mem_level: int, n: int, warm: int = 0) -> dict[str, Any]:
    spec = {"frames": str(frames_file), "kind": kind, "wbits": wbits, "mem_level": mem_level, "n": n}
    if warm:
        spec["warm_bytes"] = warm
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def zlib_formula_kib(wbits: int, mem_level: int) -> float:
    """zlib.h's figure for deflate: (1 << (windowBits+2)) + (1 << (memLevel+9)) bytes, plus
    its state struct (about 5.8 KiB on LP64)."""
    return round(((1 << (wbits + 2)) + (1 << (mem_level + 9)) + 5_944) / 1024, 1)


# --- The run ---


def analyse(
    captured: dict[str, Any], fans: dict[str, dict[str, Any]], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    streams = [[f.encode() for f in s] for s in captured["streams"]]
    sends = [s.encode() for s in captured["sends"]]
    timer = timer_overhead()
    trials = args.trials
    print(f"compressing {sum(len(s) for s in streams):,} frames x {trials} trials", flush=True)
    a = [no_takeover(streams, LEVEL, WBITS, MEM_LEVEL, check=t == 0) for t in range(trials)]
    b = [takeover(streams, LEVEL, WBITS, MEM_LEVEL, check=t == 0) for t in range(trials)]
    a1 = [no_takeover(streams, 1, WBITS, MEM_LEVEL, check=False) for _ in range(trials)]
    b1 = [takeover(streams, 1, WBITS, MEM_LEVEL, check=False) for _ in range(trials)]
    # What the server would inflate if browsers compressed their sends (no context takeover).
    up = [no_takeover([sends], LEVEL, WBITS, MEM_LEVEL, check=False) for _ in range(trials)]
    figures: dict[str, Any] = {
        "no_context_takeover": summarize(a, timer),
        "context_takeover": summarize(b, timer),
        "no_context_takeover_level1": summarize(a1, timer),
        "context_takeover_level1": summarize(b1, timer),
        "client_sends_no_context_takeover": summarize(up, timer)["send"],
        "context_costs_w15_m8": context_costs(MEM_LEVEL, WBITS),
    }
    # (c) Memory and ratio per setting.
    frames_file = tmp / "frames.json"
    frames_file.write_text(json.dumps(captured["streams"][0]))
    n, n_warm = (2_000, 500) if args.quick else (10_000, 2_000)
    grid = []
    for wbits in GRID_WBITS:
        for mem_level in GRID_MEM_LEVELS:
            one = memory(frames_file, "deflate", wbits, mem_level, n)
            warm = memory(frames_file, "deflate", wbits, mem_level, n_warm, warm=2 << wbits)
            kept = takeover(streams, LEVEL, wbits, mem_level, check=False)
            fresh = no_takeover(streams, LEVEL, wbits, mem_level, check=False)
            row = {
                "wbits": wbits,
                "mem_level": mem_level,
                "kib_after_one_message": one["kib_per_context"],
                "kib_after_two_windows": warm["kib_per_context"],
                "zlib_formula_kib": zlib_formula_kib(wbits, mem_level),
                "ratio_takeover": ratio_of(kept),
                "ratio_takeover_msg": ratio_of(kept, "msg"),
                "ratio_no_takeover": ratio_of(fresh),
                "ratio_no_takeover_msg": ratio_of(fresh, "msg"),
                "compress_us_no_takeover_msg": round(
                    fresh["msg"].compress_ns / fresh["msg"].frames / 1000, 3
                ),
                "compress_us_takeover_msg": round(kept["msg"].compress_ns / kept["msg"].frames / 1000, 3),
            }
            grid.append(row)
            print("memory", row, flush=True)
    figures["contexts"] = {
        "held_per_process": n,
        "held_per_process_warm": n_warm,
        "grid": grid,
        # What the server would hold per connection to inflate a client's sends if the client
        # kept its context (unless the server answers with client_no_context_takeover).
        "inflate": [
            {
                "wbits": w,
                "kib_after_one_message": memory(frames_file, "inflate", w, 8, n)["kib_per_context"],
                "kib_after_two_windows": memory(frames_file, "inflate", w, 8, n_warm, warm=2 << w)[
                    "kib_per_context"
                ],
            }
            for w in GRID_WBITS
        ],
    }
    figures["against_server"] = against_server(figures, fans)
    return figures


def against_server(f: dict[str, Any], fans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compression CPU beside the server's own, for each fan-out measured. No context takeover:
    the server compresses each frame once (fan-out shares one encoding among the receivers, as
    it does today) and inflates each send. Context takeover: one compression per delivery (each
    connection's stream is its own), and the sender's ack."""
    a, b = f["no_context_takeover"], f["context_takeover"]
    inflate_send = f["client_sends_no_context_takeover"]["decompress_us"]
    out: dict[str, Any] = {}
    for size, fan in fans.items():
        n = fan["receivers"]
        per_delivery = fan["server_cpu_us_per_delivery"]
        per_message = fan["server_cpu_us_per_message"]
        fresh = a["msg"]["compress_us"] + a["ack"]["compress_us"] + inflate_send
        kept = n * b["msg"]["compress_us"] + b["ack"]["compress_us"] + inflate_send
        out[size] = {
            "receivers": n,
            "server_cpu_us_per_delivery": per_delivery,
            "server_cpu_us_per_message": per_message,
            "no_takeover_us_per_message": round(fresh, 2),
            "no_takeover_us_per_delivery": round(fresh / n, 3),
            "no_takeover_share_of_server_cpu": round(fresh / per_message, 3),
            "takeover_us_per_message": round(kept, 2),
            "takeover_us_per_delivery": round(kept / n, 3),
            "takeover_share_of_server_cpu": round(kept / per_message, 3),
        }
    return out


def table(f: dict[str, Any]) -> str:
    a, b = f["no_context_takeover"], f["context_takeover"]
    lines = [
        "| frames | count | payload B | wire B plain | wire B no takeover (wire ratio) | wire B takeover (wire ratio) | compress us: no takeover / takeover | client inflate us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in [k for k in a if isinstance(a[k], dict)]:
        x, y = a[kind], b[kind]
        lines.append(
            f"| {kind} | {x['frames']:,} | {x['payload_bytes_mean']} | {x['wire_bytes_per_frame']} | "
            f"{x['wire_bytes_per_frame_compressed']} ({x['wire_ratio']}) | {y['wire_bytes_per_frame_compressed']} ({y['wire_ratio']}) | "
            f"{x['compress_us']} / {y['compress_us']} | {x['decompress_us']} / {y['decompress_us']} |"
        )
    lines.append("")
    for s in f["against_server"].values():
        lines.append(
            f"1 -> {s['receivers']}: server {s['server_cpu_us_per_message']} us per message, "
            f"{s['server_cpu_us_per_delivery']} us per delivery; deflate would add: no takeover "
            f"{s['no_takeover_us_per_message']} us per message ({s['no_takeover_share_of_server_cpu']:.1%}), "
            f"takeover {s['takeover_us_per_message']} us ({s['takeover_share_of_server_cpu']:.1%})"
        )
    lines.append("")
    lines.append(
        "| wbits | memLevel | KiB/context after 1 msg | after 2 windows | zlib formula | ratio takeover (msg) | ratio no takeover |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in f["contexts"]["grid"]:
        lines.append(
            f"| {r['wbits']} | {r['mem_level']} | {r['kib_after_one_message']} | {r['kib_after_two_windows']} | "
            f"{r['zlib_formula_kib']} | {r['ratio_takeover']} ({r['ratio_takeover_msg']}) | {r['ratio_no_takeover']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000, help="chat messages sent in the group of 10")
    ap.add_argument("--receivers", type=int, default=50, help="group size of the fan-out (receivers)")
    ap.add_argument("--fanout-messages", type=int, default=1000, help="messages per fan-out trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--save-frames", type=Path, help="also write the captured frames (JSON) here")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.fanout_messages, args.trials = 600, 200, 1
    texts = chat_texts(args.messages, args.seed)
    captured, fan, measured = asyncio.run(run_server(args, texts))
    if args.save_frames:
        args.save_frames.write_text(json.dumps(captured))
    with tempfile.TemporaryDirectory() as tmp:
        figures = analyse(captured, fan, args, Path(tmp))
    lengths = sorted(len(t) for t in texts)
    out = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "deflate": {"level": LEVEL, "window_bits": WBITS, "mem_level": MEM_LEVEL, "strip_tail": True},
        "texts": {
            "count": len(texts),
            "chars_median": lengths[len(lengths) // 2],
            "short_5_40": sum(1 for n in lengths if n <= 40),
            "sentences_100_300": sum(1 for n in lengths if 100 <= n <= 300),
            "long_1k_2k": sum(1 for n in lengths if n >= 1024),
        },
        "group": {"members": 10, "p_delivered": P_DELIVERED, "p_read": P_READ, "p_typing": P_TYPING},
        "fanout": fan,
        "examples": {kind_of(f.encode()): f for f in reversed(captured["streams"][0])},
        **figures,
    }
    print(table(figures))
    record("ws_deflate", out, measured)


if __name__ == "__main__":
    main()
