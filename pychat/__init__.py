"""pychat: a Rust-accelerated Python chat engine.

Public API: `Server` (run a node), `Config`/`load_config`, and the client SDK in
`pychat.client`. Nothing imports `pychat._core` but the modules that wrap it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pychat.config import Config, Limits, load_config
from pychat.server import Server

__all__ = ["Config", "Limits", "Server", "__version__", "load_config"]
