"""LSP base-protocol framing over stdio, hardened around pygls' JSON-RPC protocol.

pygls' own stdio loop logs and drops what it cannot parse; the contract wants an error answer
for every malformed message, so the loop here reads frames itself, checks the JSON-RPC
envelope, answers -32700 / -32600 / -32602 / -32002, and hands good messages to pygls.
Outgoing messages are encoded with msgspec; notifications skip pygls' attrs machinery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any, BinaryIO

import msgspec
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import JsonRPCNotification, JsonRPCRequestMessage
from pygls.protocol.language_server import lsp_method

from cellbox.errors import ErrorCode

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HEADER_LINE = 8192  # bytes; longer lines are not headers
_CHUNK = 1 << 20
_JOIN_BELOW = 64 * 1024  # a body smaller than this goes out in one write with its header
_HEADER_NAME = re.compile(rb"[A-Za-z0-9-]+")
_NAME = b"content-length"
# a Content-Length header ending a line: in a body, where a raw line end cannot be inside a JSON
# string; on a line, where what comes before it is the rest of a body whose length was wrong
_BODY_HEADER = re.compile(_NAME + rb"[ \t]*:[ \t]*[0-9]+[ \t]*\r?\n", re.IGNORECASE)
_LINE_HEADER = re.compile(_NAME + rb"[ \t]*:[ \t]*[0-9]+[ \t]*$", re.IGNORECASE)
_AFTER_NAME = re.compile(rb"[ \t]*(?::[ \t]*[0-9]*[ \t]*\r?)?")
_KEEP_OF_LONG_LINE = 64  # bytes kept of a line too long to be a header: one may end it
_ID_SCAN_BYTES = 1 << 20  # how far into a body that does not parse its `id` is looked for
# a string (one left open takes the rest: no backtracking over the body), or a bracket
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_ID_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*(-?[0-9]+(?![0-9.eE])|"(?:[^"\\]|\\.)*")', re.DOTALL)

_encoder = msgspec.json.Encoder()


class _Notification(msgspec.Struct, kw_only=True):
    jsonrpc: str = "2.0"
    method: str
    params: Any


class _Response(msgspec.Struct, kw_only=True):
    jsonrpc: str = "2.0"
    id: int | str | None
    result: Any


class _ErrorBody(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _ErrorResponse(msgspec.Struct, kw_only=True):
    jsonrpc: str = "2.0"
    id: int | str | None
    error: _ErrorBody


class Writer:
    """Writes frames to stdout without blocking the event loop where the OS allows it.

    Its buffer is bounded by flow control: past `HIGH_WATER` bytes not yet taken by the
    client, `drain()` waits, and the kernels' output readers wait with it.
    """

    HIGH_WATER = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._transport: asyncio.WriteTransport | None = None
        self._stream: BinaryIO | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._pending = bytearray()  # small frames of this turn of the loop
        self._flush_soon = False
        self.closed = False

    @classmethod
    async def open(cls, fd: int, on_lost: Callable[[], None]) -> Writer:
        loop = asyncio.get_running_loop()
        stream = os.fdopen(fd, "wb", buffering=0)
        writer = cls()

        class _Protocol(asyncio.BaseProtocol):
            def pause_writing(self) -> None:
                writer._can_write.clear()

            def resume_writing(self) -> None:
                writer._can_write.set()

            def connection_lost(self, exc: Exception | None) -> None:
                writer.closed = True
                writer._can_write.set()
                on_lost()

        try:
            transport, _ = await loop.connect_write_pipe(_Protocol, stream)
        except (ValueError, OSError):  # a regular file: plain blocking writes
            writer._stream = stream
        else:
            transport.set_write_buffer_limits(high=cls.HIGH_WATER)
            writer._transport = transport
        return writer

    def write(self, body: bytes) -> None:
        """Writes one frame. Small frames written in one turn of the event loop go out together
        at its end, in one system call; a large one goes at once, its body not copied."""
        if self.closed:
            return
        if threading.get_ident() != self._thread:  # a log record of a worker thread
            self._loop.call_soon_threadsafe(self.write, body)
            return
        header = b"Content-Length: %d\r\n\r\n" % len(body)
        if len(body) >= _JOIN_BELOW:
            self.flush()
            self._put(header)
            self._put(body)
            return
        self._pending += header
        self._pending += body
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes the small frames that wait."""
        self._flush_soon = False
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._put(data)

    def _put(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if self._transport is not None:
                if self._transport.is_closing():
                    self.closed = True
                    return
                self._transport.write(data)
            elif self._stream is not None:
                self._stream.write(data)
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self.closed = True

    async def drain(self) -> None:
        """Waits while the client is behind by more than the high-water mark."""
        await self._can_write.wait()

    def close(self) -> None:
        self.flush()
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        elif self._stream is not None:
            self._stream.close()


class CellboxProtocol(LanguageServerProtocol):
    """pygls' LSP protocol with msgspec encoding and cellbox's lifecycle rules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialized = False
        self.exit_requested = asyncio.Event()
        self.on_initialize: Callable[[lsp.InitializeParams, lsp.InitializeResult], None] | None = None

    # -- sending ----------------------------------------------------------------------------

    def _send_data(self, data: Any) -> None:
        if not data or self.writer is None:
            return
        if hasattr(data, "__attrs_attrs__"):
            data = self._converter.unstructure(data)
        try:
            body = _encoder.encode(data)
        except (TypeError, ValueError):
            log.exception("cannot encode an outgoing message")
            return
        self.writer.write(body)

    def notify(self, method: str, params: Any | None = None) -> None:
        if hasattr(params, "__attrs_attrs__"):
            params = self._converter.unstructure(params)
        self.send_notification(method, params)

    def send_notification(self, method: str, params: Any) -> None:
        """The fast path: one msgspec encode, one write."""
        if self.writer is not None:
            self.writer.write(_encoder.encode(_Notification(method=method, params=params)))

    def _send_response(self, msg_id: Any, result: Any | None = None, error: Any = None) -> None:
        """cellbox's own results (msgspec structs) are encoded directly, not through cattrs."""
        if error is not None or hasattr(result, "__attrs_attrs__") or self.writer is None:
            super()._send_response(msg_id, result, error)
            return
        self._result_types.pop(msg_id, None)
        try:
            body = _encoder.encode(_Response(id=msg_id, result=result))
        except (TypeError, ValueError):
            log.exception("cannot encode the result of request %r", msg_id)
            self.send_error(msg_id, ErrorCode.INTERNAL_ERROR, "unencodable result")
            return
        self.writer.write(body)

    def send_error(self, msg_id: int | str | None, code: int, message: str, data: Any = None) -> None:
        if self.writer is not None:
            body = _encoder.encode(_ErrorResponse(id=msg_id, error=_ErrorBody(code, message, data)))
            self.writer.write(body)

    # -- lifecycle --------------------------------------------------------------------------

    @lsp_method(lsp.INITIALIZE)
    def lsp_initialize(self, params: lsp.InitializeParams) -> Generator[Any, Any, lsp.InitializeResult]:
        result = yield from super().lsp_initialize(params)
        if self.on_initialize is not None:
            self.on_initialize(params, result)
        self.initialized = True
        return result

    @lsp_method(lsp.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        """Ends the serve loop (pygls would call sys.exit inside the handler)."""
        if (user_handler := self.fm.features.get(lsp.EXIT)) is not None:
            yield user_handler, args, None
        self.exit_requested.set()

    # -- receiving --------------------------------------------------------------------------

    def receive(self, raw: Any) -> None:
        """Checks one frame's decoded body as a JSON-RPC message and hands it to pygls."""
        if not isinstance(raw, dict):
            kind = "a batch" if isinstance(raw, list) else f"a JSON {type(raw).__name__}"
            self.send_error(
                None, ErrorCode.INVALID_REQUEST, f"Invalid request: expected an object, got {kind}"
            )
            return
        msg_id = raw.get("id")
        has_id = "id" in raw
        if has_id and (isinstance(msg_id, bool) or not isinstance(msg_id, int | str)):
            self.send_error(
                None, ErrorCode.INVALID_REQUEST, "Invalid request: `id` must be an integer or a string"
            )
            return
        answer_id = msg_id if has_id else None
        if raw.get("jsonrpc") != "2.0":
            self.send_error(answer_id, ErrorCode.INVALID_REQUEST, 'Invalid request: `jsonrpc` must be "2.0"')
            return
        method = raw.get("method")
        if "method" in raw and not isinstance(method, str):
            self.send_error(
                answer_id, ErrorCode.INVALID_REQUEST, "Invalid request: `method` must be a string"
            )
            return
        if method is None:
            if not has_id or ("result" not in raw and "error" not in raw):
                self.send_error(answer_id, ErrorCode.INVALID_REQUEST, "Invalid request: no `method`")
                return
            self._receive_response(raw)
            return
        params = raw.get("params")
        if params is not None and not isinstance(params, dict | list):
            if has_id:
                self.send_error(
                    msg_id, ErrorCode.INVALID_PARAMS, "Invalid params: `params` must be an object"
                )
            else:
                log.warning("ignored %s notification: `params` must be an object", method)
            return
        if has_id and self._shutdown and method != lsp.EXIT:
            self.send_error(msg_id, ErrorCode.INVALID_REQUEST, f"{method}: the server is shutting down")
            return
        if not self.initialized and method not in (lsp.INITIALIZE, lsp.EXIT):
            if has_id:
                self.send_error(
                    msg_id, ErrorCode.SERVER_NOT_INITIALIZED, f"{method}: send `initialize` first"
                )
            else:
                log.warning("ignored %s notification before initialize", method)
            return
        if has_id and method == lsp.INITIALIZE and self.initialized:
            self.send_error(
                msg_id, ErrorCode.INVALID_REQUEST, "initialize: the server is already initialized"
            )
            return
        if self.get_message_type(method) is None:
            # cellbox's own methods: params stay plain JSON for msgspec to decode
            message: Any = (
                JsonRPCRequestMessage(id=msg_id, method=method, jsonrpc="2.0", params=params)
                if msg_id is not None
                else JsonRPCNotification(method=method, jsonrpc="2.0", params=params)
            )
            self.handle_message(message)
            return
        try:
            message = self.structure_message(raw)
        except JsonRpcException as exc:
            cause = exc.__cause__ or exc
            if has_id:
                self.send_error(msg_id, ErrorCode.INVALID_PARAMS, f"Invalid params for {method}: {cause}")
            else:
                log.warning("ignored %s notification with invalid params: %s", method, cause)
            return
        self.handle_message(message)

    def _receive_response(self, raw: dict[str, Any]) -> None:
        try:
            self.handle_message(self.structure_message(raw))
        except JsonRpcException:
            log.warning("ignored a malformed response to request %r", raw.get("id"))


def _top_level_id(body: bytes) -> int | str | None:
    """The `id` member of a body that does not parse, when it can be read (in its first MiB),
    so that the request's error answer reaches whoever waits for it."""
    depth = 0
    for token in _TOKEN.finditer(body, 0, _ID_SCAN_BYTES):
        text = token[0]
        if text[0] != 0x22:  # a bracket
            depth += 1 if text in b"[{" else -1
        elif depth == 1 and text == b'"id"' and (value := _ID_VALUE.match(body, token.end())):
            try:
                found = msgspec.json.decode(value[1])
            except (msgspec.DecodeError, UnicodeDecodeError):
                return None
            return found if isinstance(found, int | str) else None
    return None


class _Frames:
    """The reader, with bytes put back in front: a body that does not parse but holds a
    `Content-Length` header (its own length was wrong) gives back the frames it swallowed."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.back = b""
        self.at = 0  # where the unread part of `back` starts

    def put_back(self, data: bytes) -> None:
        self.back, self.at = data + self.back[self.at :], 0

    def _take(self, n: int) -> bytes:
        piece = self.back[self.at : self.at + n]
        self.at += len(piece)
        if self.at == len(self.back):
            self.back, self.at = b"", 0
        return piece

    async def line(self) -> bytes | None:
        """The next line; None for one too long to be a header, of which only the end is kept
        (a header may end it, after the rest of a body whose length was wrong)."""
        end = self.back.find(b"\n", self.at)
        if end >= 0:
            return self._take(end + 1 - self.at)
        head = self._take(len(self.back))
        try:
            return head + await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            dropped = head + await self.reader.readexactly(exc.consumed)
            self.put_back(dropped[-_KEEP_OF_LONG_LINE:])
            return None

    async def exactly(self, n: int) -> bytes:
        head = self._take(n)
        return head + await self.reader.readexactly(n - len(head)) if len(head) < n else head

    async def skip(self, n: int) -> bool:
        """Drops n bytes; False at the end of the input."""
        n -= len(self._take(n))
        while n:
            chunk = await self.reader.read(min(n, _CHUNK))
            if not chunk:
                return False
            n -= len(chunk)
        return True


async def read_frames(reader: asyncio.StreamReader, protocol: CellboxProtocol) -> None:
    """Reads LSP frames until EOF.

    A run of lines that are not headers is answered with one parse error and skipped, so the
    loop finds the next `Content-Length` header, also in the middle of a line, and goes on from
    there; a body that does not parse is cut at a `Content-Length` header inside it.
    """
    frames = _Frames(reader)
    while True:
        length: int | None = None
        garbage = False

        def bad(problem: str) -> None:
            nonlocal garbage, length
            if not garbage:
                protocol.send_error(None, ErrorCode.PARSE_ERROR, f"Parse error: {problem}")
            garbage, length = True, None

        while True:
            try:
                line = await frames.line()
            except asyncio.IncompleteReadError:
                return
            if line is None:
                bad("a header line is too long")
                continue
            text = line.strip()
            if not text:
                if length is not None:
                    break
                continue
            if (found := _LINE_HEADER.search(text)) is not None and found.start():
                bad(f"not a header line: {text[: min(found.start(), 60)]!r}")
                text = text[found.start() :]
            name, sep, value = text.partition(b":")
            if not sep or not _HEADER_NAME.fullmatch(name.strip()):
                bad(f"not a header line: {text[:60]!r}")
            elif name.strip().lower() == b"content-length":
                value = value.strip()
                if value.isdigit() and len(value) < 16:
                    length, garbage = int(value), False
                else:
                    bad(f"bad Content-Length {value[:40]!r}")
        if length > MAX_MESSAGE_BYTES:
            protocol.send_error(
                None,
                ErrorCode.PARSE_ERROR,
                f"Parse error: a message of {length} bytes exceeds {MAX_MESSAGE_BYTES}",
            )
            if not await frames.skip(length):
                return
            continue
        try:
            body = await frames.exactly(length)
        except asyncio.IncompleteReadError:
            return
        raw, why = _decode(body)
        if why and (cut := _next_header(body)) is not None:
            # a whole header is given back; the start of one only if the rest then parses
            head_raw, head_why = _decode(body[: cut[0]])
            if cut[1] or not head_why:
                frames.put_back(body[cut[0] :])
                body, raw, why = body[: cut[0]], head_raw, head_why
        if why:
            protocol.send_error(_top_level_id(body), ErrorCode.PARSE_ERROR, f"Parse error: {why}")
            continue
        try:
            protocol.receive(raw)
        except Exception:  # a bug in a handler must not end the loop
            log.exception("error while handling a message")


def _next_header(body: bytes) -> tuple[int, bool] | None:
    """Where the next frame's header starts in a body that does not parse, and whether it is
    all there: a `Content-Length` header line inside it, or the start of one at its end (the
    body was shorter than its length said, and took the next header's first bytes)."""
    if (found := _BODY_HEADER.search(body)) is not None:
        return found.start(), True
    for start in range(max(0, len(body) - 40), len(body)):
        tail = body[start:].lower()
        if _NAME.startswith(tail) or (tail.startswith(_NAME) and _AFTER_NAME.fullmatch(tail, len(_NAME))):
            return start, False
    return None


def _decode(body: bytes) -> tuple[Any, str]:
    """A body's JSON, or why it is none: malformed, not UTF-8, or nested too deeply."""
    try:
        return msgspec.json.decode(body), ""
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return None, str(exc) or type(exc).__name__
    except RecursionError:
        return None, "JSON nested too deeply"


async def open_stdio() -> tuple[asyncio.StreamReader, int]:
    """Takes the process' stdin and stdout for the protocol.

    fd 0 and fd 1 are then pointed at /dev/null and stderr, so that nothing else (a library
    that prints, a child process) can read protocol bytes or write into the stream.
    Returns the reader and the file descriptor to write frames to.
    """
    in_fd = os.dup(sys.stdin.fileno())
    out_fd = os.dup(sys.stdout.fileno())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(sys.stderr.fileno(), 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEADER_LINE * 2)
    stream = os.fdopen(in_fd, "rb", buffering=0)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    except (ValueError, OSError):
        # a regular file on stdin: feed the reader from a thread
        def pump() -> None:
            while chunk := stream.read(_CHUNK):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
            loop.call_soon_threadsafe(reader.feed_eof)

        loop.run_in_executor(None, pump)
    return reader, out_fd
