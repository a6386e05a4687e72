"""The daemon as an MCP client: one connection to a registered server, for a sandbox's tools.

A stdio server runs as the daemon's child (through a launcher that makes it die with the
daemon, even a killed one) with the SDK's small default environment plus its own `env`; a
streamable HTTP server is reached with its `headers`. Neither `env` nor `headers` goes near the
sandbox. The SDK's session lives in a task of its own (its transports are context managers
that must be entered and left in one task); calls are made from the tasks of the sandbox's
tool calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import IO, Any, TextIO, cast

import anyio
import mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types.jsonrpc import CONNECTION_CLOSED

from cellbox import __version__, errors
from cellbox import types as t

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a server to start and list its tools (npx may download first)
CLOSE_TIMEOUT = 5.0
LOG_TAIL = 16 << 10  # bytes of a stdio server's stderr shown when it fails
_MAX_PAGES = 100  # pages of tools/list read: a server that pages without end is cut there

# Runs the server's command so that it dies with the daemon (PR_SET_PDEATHSIG survives exec).
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


class _Tail(asyncio.Protocol):
    """The end of what a stdio server writes to its stderr, kept in a bounded buffer."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        del self.data[:-LOG_TAIL]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class McpServer:
    """A registered server: its tools as it listed them, and calls of them."""

    def __init__(self, name: str, spec: t.McpServerSpec, approval: t.Approval) -> None:
        self.name = name
        self.spec = spec
        self.approval = approval
        self.tools: dict[str, mcp_types.Tool] = {}
        self._client: Client | None = None
        self._tail: _Tail | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._starting = asyncio.Lock()  # one start at a time, also of concurrent calls
        self._released = False

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._client is not None

    async def start(self) -> None:
        """Connects and lists the tools; McpServerFailed, with the server's output, if it cannot."""
        if self._released:
            raise errors.McpServerFailed(f"MCP server {self.name!r} was unregistered", {"log": ""})
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._closing.clear()
        self._task = asyncio.create_task(self._serve(ready), name=f"mcp-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
        except TimeoutError:
            await self.close()
            raise self._failed(f"did not answer within {START_TIMEOUT:g} s") from None
        except Exception as exc:
            await self.close()
            if self._tail is not None:  # what it said before it ended
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._tail.ended), 1.0)
            raise self._failed(_describe(exc)) from None
        except BaseException:  # cancelled: the server must not outlive the request
            await asyncio.shield(self.close())
            raise

    async def _serve(self, ready: asyncio.Future[None]) -> None:
        client: Client | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                transport, errlog = await self._transport(stack)
                client = await stack.enter_async_context(Client(transport, client_info=_INFO))
                if errlog is not None:
                    errlog.close()  # the server's process has its copy: its end is the pipe's end
                self.tools = await _list_tools(client)
                self._client = client
                ready.set_result(None)
                closing = asyncio.ensure_future(self._closing.wait())
                # a stdio server's end closes its stderr: the next call starts it again
                ends: list[asyncio.Future[Any]] = [closing]
                if errlog is not None and self._tail is not None:
                    ends.append(self._tail.ended)
                try:
                    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                if not self._closing.is_set():
                    log.warning("MCP server %s ended; it is started again for its next call", self.name)
                self._client = None  # at once: the SDK's own end of the connection takes a while
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            elif not self._closing.is_set():
                log.warning("MCP server %s: the connection ended: %s", self.name, _describe(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._client is client:  # not a newer start's
                self._client = None

    async def _transport(self, stack: contextlib.AsyncExitStack) -> tuple[Any, IO[bytes] | None]:
        """The SDK's transport, and the write end of a stdio server's stderr pipe."""
        spec = self.spec
        if spec.url is not None:
            http = await stack.enter_async_context(create_mcp_http_client(headers=spec.headers))
            return streamable_http_client(spec.url, http_client=http), None
        assert spec.command is not None
        read_end, write_end = os.pipe()
        errlog = os.fdopen(write_end, "wb", buffering=0)
        stack.callback(errlog.close)
        tail = _Tail()
        if self._tail is not None:
            tail.data = self._tail.data  # what earlier runs said stays
        self._tail = tail
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: tail, os.fdopen(read_end, "rb", buffering=0)
        )
        stack.callback(pipe.close)
        params = StdioServerParameters(
            command=sys.executable,
            args=["-c", _LAUNCH, spec.command, *spec.args],
            env=spec.env,
            cwd=spec.cwd,
        )
        return stdio_client(params, errlog=cast(TextIO, errlog)), errlog  # the child's stderr only

    async def call(self, tool: str, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        """Calls a tool; a server whose connection ended is started again for the next call
        (not for this one, which may have been what ended it)."""
        async with self._starting:
            if not self.alive:
                await self.start()
        client = self._client
        if client is None:
            raise errors.McpServerFailed(f"MCP server {self.name!r} is gone", {"log": self.output()})
        scope = anyio.CancelScope()

        async def run() -> mcp_types.CallToolResult:
            with scope:
                return await client.call_tool(tool, arguments)
            raise asyncio.CancelledError

        inner = asyncio.create_task(run())
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # ended by anyio's cancellation, which lets the SDK tell the server (MCP's
            # notifications/cancelled); asyncio's own would cut that message off
            scope.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(inner, CLOSE_TIMEOUT)
            raise
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                await self.close()
            raise

    def output(self) -> str:
        """The end of what a stdio server wrote to its stderr."""
        return "" if self._tail is None else self._tail.data.decode(errors="replace")

    def _failed(self, why: str) -> errors.McpServerFailed:
        where = self.spec.url or self.spec.command
        return errors.McpServerFailed(f"MCP server {self.name!r} ({where}) {why}", {"log": self.output()})

    async def close(self) -> None:
        """Ends the connection (and a stdio server's process)."""
        self._closing.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def release(self) -> None:
        """Once unregistered, it starts no more."""
        self._released = True


_INFO = mcp_types.Implementation(name="cellbox", version=__version__)


async def _list_tools(client: Client) -> dict[str, mcp_types.Tool]:
    tools: dict[str, mcp_types.Tool] = {}
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            tools.setdefault(tool.name, tool)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _describe(exc: BaseException) -> str:
    """An exception as a line, the first of an exception group's if it is one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"failed: {text}"
