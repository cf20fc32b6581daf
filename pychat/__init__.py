"""pychat: a Rust-accelerated Python chat engine.

Public API: `Server` (run a node), `Config`/`load_config`, and the client SDK in
`pychat.client`. Only `pychat.gateway` imports the Rust extension `pychat._core`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pychat.config import Config, Limits, load_config
from pychat.server import Server

__all__ = ["Config", "Limits", "Server", "__version__", "load_config"]
