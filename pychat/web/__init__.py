"""The web chat page and the API docs page, served by the REST port from files in this folder:
plain HTML, CSS and JavaScript modules (no build step), read once at start."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The contract: api/ of a source checkout, else the copy `make wheel` puts here.
CHECKOUT_API = HERE.parent.parent / "api"
CONTRACT = {
    "/api/openapi.json": "openapi.json",
    "/api/ws-frames.schema.json": "ws-frames.schema.json",
}

# What a page URL serves, and its type.
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/docs": ("docs.html", "text/html; charset=utf-8"),
    "/docs.js": ("docs.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# The pages load nothing from elsewhere: scripts and styles from this server, WebSocket to the
# gateway's port, images of attachments through blob: URLs.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class Page:
    body: bytes
    content_type: str
    etag: str


def _page(body: bytes, content_type: str) -> Page:
    return Page(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_pages() -> dict[str, Page]:
    pages = {
        url: _page((HERE / name).read_bytes(), content_type) for url, (name, content_type) in PAGES.items()
    }
    in_checkout = (HERE.parent.parent / "pyproject.toml").is_file()
    for url, name in CONTRACT.items():
        path = CHECKOUT_API / name if in_checkout else HERE / name
        if path.is_file():
            pages[url] = _page(path.read_bytes(), "application/json")
    return pages
