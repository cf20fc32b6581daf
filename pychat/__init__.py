"""pychat: a Rust-accelerated Python chat engine.

Public API: `Server` (run a node), `Config`/`load_config`, and the client SDK in
`pychat.client`. Only `pychat.gateway` imports the Rust extension `pychat._core`.
The server's names load on first use, so `import pychat.client` needs only the SDK's
dependencies (httpx, websockets): no Rust extension, Pillow or pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Config", "Limits", "Server", "__version__", "load_config"]

if TYPE_CHECKING:
    from pychat.config import Config, Limits, load_config
    from pychat.server import Server


def __getattr__(name: str) -> Any:
    if name in ("Config", "Limits", "load_config"):
        from pychat import config

        return getattr(config, name)
    if name == "Server":
        from pychat.server import Server

        return Server
    raise AttributeError(f"module 'pychat' has no attribute {name!r}")
