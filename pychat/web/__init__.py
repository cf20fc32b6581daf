"""The web chat page and the API docs page, served by the REST port from files in this folder:
plain HTML, CSS and JavaScript modules (no build step), read and gzip-compressed once at start."""

from __future__ import annotations

import gzip
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
    # The body gzip-compressed, when that makes it smaller (with an ETag of its own: another
    # representation of the same file).
    gzipped: bytes | None = None

    def encoded(self, accept_encoding: str) -> tuple[bytes, str, list[tuple[str, str]]]:
        """The body, ETag and headers for a request's Accept-Encoding: gzip when the client takes
        it, else the file as it is; always `Vary: Accept-Encoding`, which caches key on."""
        vary = [("vary", "Accept-Encoding")]
        if self.gzipped is not None and accepts_gzip(accept_encoding):
            return self.gzipped, self.etag[:-1] + '-gzip"', [*vary, ("content-encoding", "gzip")]
        return self.body, self.etag, vary


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header (RFC 9110 12.5.3) allows gzip: named, or `*`, with q > 0."""
    weights: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        coding, _, param = item.partition(";")
        key, _, value = param.strip().partition("=")
        try:
            weights[coding.strip()] = float(value) if key.strip() == "q" else 1.0
        except ValueError:
            weights[coding.strip()] = 0.0
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


def _page(body: bytes, content_type: str) -> Page:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    gzipped = gzip.compress(body, compresslevel=9, mtime=0)
    return Page(body, content_type, etag, gzipped if len(gzipped) < len(body) else None)


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
