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
MAX_FILE_PIECE = 64 << 20  # bytes of a file one call moves, at the most (the file_cap setting)

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


def kernel_pieces(slot: int, channel: int, parts: list[bytes]) -> list[bytes]:
    """A KERNEL frame as the pieces to write one after the other, the parts not copied."""
    pieces = [b""]
    size = 6
    for part in parts:
        pieces.append(_U32.pack(len(part)))
        pieces.append(part)
        size += 4 + len(part)
    pieces[0] = _KERNEL_HEAD.pack(size, KERNEL, slot, channel)
    return pieces


def kernel_frame(slot: int, channel: int, parts: list[bytes]) -> bytes:
    return b"".join(kernel_pieces(slot, channel, parts))


def credit_frame(slot: int, count: int) -> bytes:
    return frame(CREDIT, slot, _U32.pack(count))


def split_json(payload: bytes | memoryview) -> tuple[Any, bytes]:
    """A CALL, REPLY or EVENT payload: its JSON and its blob."""
    if len(payload) < 4:
        raise FrameError("a JSON frame shorter than its length field")
    (size,) = _U32.unpack_from(payload)
    if 4 + size > len(payload):
        raise FrameError("a JSON frame shorter than its JSON")
    try:
        obj = json.loads(bytes(payload[4 : 4 + size]))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise FrameError(f"bad JSON in a frame: {exc}") from None
    return obj, bytes(payload[4 + size :])


def split_kernel(payload: bytes | memoryview) -> tuple[int, list[memoryview]]:
    """A KERNEL payload: its channel and the parts of its message, views into the payload."""
    if not payload:
        raise FrameError("an empty kernel frame")
    view = memoryview(payload)
    channel = payload[0]
    parts: list[memoryview] = []
    offset, end = 1, len(payload)
    while offset < end:
        if offset + 4 > end:
            raise FrameError("a kernel frame cut inside a part's length")
        (size,) = _U32.unpack_from(payload, offset)
        offset += 4
        if offset + size > end:
            raise FrameError("a kernel frame shorter than its parts")
        parts.append(view[offset : offset + size])
        offset += size
    return channel, parts


def split_count(payload: bytes | memoryview) -> int:
    if len(payload) != 4:
        raise FrameError("a credit frame that is not 4 bytes")
    return int(_U32.unpack(payload)[0])


class Parser:
    """Cuts a byte stream into frames: `feed` returns the (type, id, payload) of those complete.

    A large frame that comes in many pieces is kept as the pieces and joined once, when the
    last one is in, its payload a view of that: a 1 MiB message is copied once, not once per
    piece read.
    """

    def __init__(self, limits: dict[int, int] | None = None) -> None:
        self._buffer = bytearray()  # what is not a whole frame yet
        self._pieces: list[bytes | memoryview] = []  # a large frame, as it came
        self._needed = 0  # bytes the large frame still needs
        self._limits = limits or {}  # the largest frame of a type (others: MAX_FRAME)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes | memoryview]]:
        frames: list[tuple[int, int, bytes | memoryview]] = []
        if self._needed:
            if len(data) < self._needed:
                self._pieces.append(data)
                self._needed -= len(data)
                return frames
            view = memoryview(data)
            self._pieces.append(view[: self._needed])
            data = view[self._needed :]  # type: ignore[assignment]
            whole = b"".join(self._pieces)
            self._pieces, self._needed = [], 0
            _, kind, ident = _HEAD.unpack_from(whole)
            frames.append((kind, ident, memoryview(whole)[9:]))
        buffer = self._buffer
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= 9:
            size, kind, ident = _HEAD.unpack_from(buffer, start)
            if size < 5 or size > (limit := self._limits.get(kind, MAX_FRAME)):
                raise FrameError(f"a frame of type {kind} of {size} bytes (at most {limit})")
            if end - start < 4 + size:
                if size > 1 << 16:  # a large frame begun: the rest is kept as it comes
                    self._pieces = [bytes(buffer[start:])]
                    self._needed = 4 + size - (end - start)
                    start = end
                break
            frames.append((kind, ident, bytes(buffer[start + 9 : start + 4 + size])))
            start += 4 + size
        if start:
            del buffer[:start]
        return frames
