"""Decoding a kernel's messages from their zmq frames: the hot path of every execution.

jupyter_client's `Session.deserialize` decodes every part of every message with `json.loads`
and parses the dates in its headers; the daemon needs the type, the parent's id and the
content. `decode` checks the signature as jupyter_client does (HMAC over the four parts,
constant-time compare) and decodes just those, with msgspec.
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec

_DELIM = b"<IDS|MSG>"


class Message(msgspec.Struct, frozen=True):
    msg_type: str
    parent_id: str | None
    content: dict[str, Any]


class _Header(msgspec.Struct):
    msg_type: str


class _Parent(msgspec.Struct):
    msg_id: str | None = None


_header = msgspec.json.Decoder(_Header)
_parent = msgspec.json.Decoder(_Parent)
_content = msgspec.json.Decoder(dict[str, Any])


def decode(frames: list[bytes], auth: hmac.HMAC | None) -> Message:
    """The message in a kernel's zmq frames, signed with `auth` (None: unsigned); ValueError
    for what is not a Jupyter message or whose signature does not match the key."""
    try:
        start = frames.index(_DELIM) + 1
    except ValueError:
        raise ValueError("no <IDS|MSG> delimiter") from None
    if len(frames) < start + 5:
        raise ValueError(f"{len(frames) - start} parts after the delimiter, not 5 or more")
    signature, header, parent, metadata, content = frames[start : start + 5]
    if auth is not None:
        check = auth.copy()
        for part in (header, parent, metadata, content):
            check.update(part)
        if not hmac.compare_digest(signature, check.hexdigest().encode()):
            raise ValueError("invalid signature")
    msg_type = _header.decode(header).msg_type
    return Message(msg_type, _parent.decode(parent).msg_id, _content.decode(content))
