"""Verifiable history: each chat's messages form a hash chain.

A message's `chain` value is SHA-256 over the previous message's value (before the chat's first
message: `genesis(chat_id)`, so a chat's history cannot pass for another chat's) and what the
message says, each field length-prefixed so no two messages encode alike:

    chain(n) = SHA-256( chain(n-1)
                        || seq (8 bytes, big-endian) || created_at ms (8 bytes, big-endian)
                        || len || sender_id || len || content || len || media ids joined by ","
                      )   lengths 4 bytes big-endian, text UTF-8

The store computes it as it numbers a message (in the same write), keeps it with the message and
exports it; `pychat verify` recomputes it from an export. Changing one byte of a message, removing
one or swapping two changes every value after it, so a chat's last value (kept in the export's
watermark, and in the store) vouches for its whole history.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable

_GENESIS_TAG = b"pychat chain v1\0"
_HEAD = struct.Struct(">qq")
_LEN = struct.Struct(">I")


def genesis(chat_id: str) -> bytes:
    """The value a chat's first message follows."""
    return hashlib.sha256(_GENESIS_TAG + chat_id.encode()).digest()


def link(
    prev: bytes, seq: int, sender_id: str, content: str, created_at: int, media_ids: Iterable[str]
) -> bytes:
    """The chain value of a message that follows one whose value is `prev`."""
    h = hashlib.sha256(prev)
    h.update(_HEAD.pack(seq, created_at))
    for text in (sender_id, content, ",".join(media_ids)):
        data = text.encode()
        h.update(_LEN.pack(len(data)))
        h.update(data)
    return h.digest()


def media_ids_of(attachments_json: str) -> list[str]:
    """The media ids of a stored message's attachments (JSON text, as the stores keep them)."""
    if attachments_json in ("", "[]"):
        return []
    return [a["media_id"] for a in json.loads(attachments_json)]


def link_stored(
    prev: bytes, seq: int, sender_id: str, content: str, created_at: int, attachments_json: str
) -> bytes:
    return link(prev, seq, sender_id, content, created_at, media_ids_of(attachments_json))
