"""Decoding a kernel's messages from their zmq frames: the hot path of every execution.

jupyter_client's `Session.deserialize` decodes every part of every message with `json.loads`
and parses the dates in its headers; the daemon needs the type, the parent's id and the
content, and `decode` decodes just those, with msgspec.
"""

from __future__ import annotations

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


def decode(frames: list[memoryview]) -> Message:
    """The message in a kernel's zmq frames; ValueError for what is not a Jupyter message.

    The signature is not checked: the key is in the sandbox with the kernel, so whatever can put
    a message on the channel can sign it, and the check would prove nothing. (The kernel checks
    what the daemon sends, as Jupyter has it.)
    """
    start = next((i for i, frame in enumerate(frames) if frame == _DELIM), -1) + 1
    if not start:
        raise ValueError("no <IDS|MSG> delimiter")
    if len(frames) < start + 5:
        raise ValueError(f"{len(frames) - start} parts after the delimiter, not 5 or more")
    _, header, parent, _, content = frames[start : start + 5]
    msg_type = _header.decode(header).msg_type
    return Message(msg_type, _parent.decode(parent).msg_id, _content.decode(content))
