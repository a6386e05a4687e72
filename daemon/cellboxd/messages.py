"""Reading a kernel's messages off its zmq sockets: the hot path of every execution.

jupyter_client's `Session.deserialize` decodes every part of every message with `json.loads`
and parses the dates in its headers; the daemon needs the type, the parent's id and the
content. This reader checks the signature as jupyter_client does (HMAC over the four parts,
constant-time compare) and decodes just those, with msgspec.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import zmq.asyncio

log = logging.getLogger(__name__)

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


class Reader:
    """Receives and decodes the messages of one socket, signed with `auth` (None: unsigned)."""

    def __init__(self, socket: zmq.asyncio.Socket, auth: hmac.HMAC | None) -> None:
        self._socket = socket
        self._auth = auth

    async def next(self) -> Message:
        """The next good message; one that is not a Jupyter message, or whose signature does not
        match the key, is logged and skipped."""
        while True:
            frames: list[bytes] = await self._socket.recv_multipart()
            try:
                return self._decode(frames)
            except ValueError as exc:  # msgspec.DecodeError is one
                log.warning("ignored a kernel message: %s", exc)

    def _decode(self, frames: list[bytes]) -> Message:
        try:
            start = frames.index(_DELIM) + 1
        except ValueError:
            raise ValueError("no <IDS|MSG> delimiter") from None
        if len(frames) < start + 5:
            raise ValueError(f"{len(frames) - start} parts after the delimiter, not 5 or more")
        signature, header, parent, metadata, content = frames[start : start + 5]
        if self._auth is not None:
            check = self._auth.copy()
            for part in (header, parent, metadata, content):
                check.update(part)
            if not hmac.compare_digest(signature, check.hexdigest().encode()):
                raise ValueError("invalid signature")
        msg_type = _header.decode(header).msg_type
        return Message(msg_type, _parent.decode(parent).msg_id, _content.decode(content))
