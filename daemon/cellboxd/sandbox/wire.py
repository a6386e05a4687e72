"""The framing of the channel between the daemon and a sandbox's agent: one byte stream, both ways.

A frame is a 4-byte big-endian length `n`, then `n` bytes: a type byte, a 4-byte id, and the
payload. Types:

- KERNEL (both ways), id = the kernel's slot: a channel byte (see CHANNELS), then each part of
  one Jupyter message as a 4-byte length and its bytes, exactly as zmq carries them.
- CALL (daemon to agent), id = the call's number; REPLY (agent to daemon) answers it with the
  same id; EVENT (agent to daemon), id 0: a 4-byte length, that much JSON, and the rest of the
  payload as a binary blob (a file's content, a command's output).
- CREDIT (daemon to agent), id = the kernel's slot: a 4-byte count of output credits.

Standard library only: the agent imports it inside the sandbox.
"""

from __future__ import annotations

import json
import struct
from typing import Any

KERNEL, CALL, REPLY, EVENT, CREDIT = 1, 2, 3, 4, 5
CHANNELS = ("shell", "iopub", "stdin", "control")
CHANNEL = {name: index for index, name in enumerate(CHANNELS)}
MAX_FRAME = 1 << 28  # bytes: a larger frame ends the channel

_HEAD = struct.Struct("!IBI")
_U32 = struct.Struct("!I")
_KERNEL_HEAD = struct.Struct("!IBIB")


class FrameError(Exception):
    """The other side sent what is not a frame of this protocol."""


def frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) + 5, kind, ident) + payload


def json_frame(kind: int, ident: int, obj: Any, blob: bytes = b"") -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return b"".join((_HEAD.pack(9 + len(body) + len(blob), kind, ident), _U32.pack(len(body)), body, blob))


def kernel_frame(slot: int, channel: int, parts: list[bytes]) -> bytes:
    pieces = [b""]
    size = 6
    for part in parts:
        pieces.append(_U32.pack(len(part)))
        pieces.append(part)
        size += 4 + len(part)
    pieces[0] = _KERNEL_HEAD.pack(size, KERNEL, slot, channel)
    return b"".join(pieces)


def credit_frame(slot: int, count: int) -> bytes:
    return frame(CREDIT, slot, _U32.pack(count))


def split_json(payload: bytes) -> tuple[Any, bytes]:
    """A CALL, REPLY or EVENT payload: its JSON and its blob."""
    if len(payload) < 4:
        raise FrameError("a JSON frame shorter than its length field")
    (size,) = _U32.unpack_from(payload)
    if 4 + size > len(payload):
        raise FrameError("a JSON frame shorter than its JSON")
    try:
        obj = json.loads(payload[4 : 4 + size])
    except ValueError as exc:
        raise FrameError(f"bad JSON in a frame: {exc}") from None
    return obj, payload[4 + size :]


def split_kernel(payload: bytes) -> tuple[int, list[bytes]]:
    """A KERNEL payload: its channel and the parts of its message."""
    if not payload:
        raise FrameError("an empty kernel frame")
    channel = payload[0]
    parts: list[bytes] = []
    offset, end = 1, len(payload)
    while offset < end:
        if offset + 4 > end:
            raise FrameError("a kernel frame cut inside a part's length")
        (size,) = _U32.unpack_from(payload, offset)
        offset += 4
        if offset + size > end:
            raise FrameError("a kernel frame shorter than its parts")
        parts.append(payload[offset : offset + size])
        offset += size
    return channel, parts


def split_count(payload: bytes) -> int:
    if len(payload) != 4:
        raise FrameError("a credit frame that is not 4 bytes")
    return int(_U32.unpack(payload)[0])


class Parser:
    """Cuts a byte stream into frames: `feed` returns the (type, id, payload) of those complete."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, int, bytes]] = []
        start, end = 0, len(buffer)
        while end - start >= 9:
            size, kind, ident = _HEAD.unpack_from(buffer, start)
            if size < 5 or size > self._max:
                raise FrameError(f"a frame of {size} bytes (at most {self._max})")
            if end - start < 4 + size:
                break
            frames.append((kind, ident, bytes(buffer[start + 9 : start + 4 + size])))
            start += 4 + size
        if start:
            del buffer[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received of a frame not complete yet."""
        return len(self._buffer)
