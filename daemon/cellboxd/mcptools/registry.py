"""The MCP servers registered in one sandbox, and the calls of their tools (see __init__)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cellbox import errors
from cellbox import types as t
from cellboxd import files
from cellboxd.backends.base import SandboxRuntime
from cellboxd.execution import Execution
from cellboxd.mcptools import answer, codegen

if TYPE_CHECKING:
    from cellboxd.mcptools.servers import McpServer

log = logging.getLogger(__name__)

FOLDER = "skills/mcptools"  # in the workspace, whose skills/ is on the kernels' path
RESULT_CAP = 32 << 20  # bytes of a tool's answer handed to a kernel
RUNTIME = (Path(__file__).parent / "runtime.py").read_text()

Approve = Callable[[t.ApproveToolCallParams], Awaitable[bool]]


class _Request(msgspec.Struct):
    server: str
    tool: str
    arguments: dict[str, Any] = {}


# Names a server cannot have: the attributes of `mcptools` itself (runtime.py), which the
# import of `mcptools.<name>` would replace.
RESERVED = frozenset(["call", "ToolError", "ToolCallRejected", "annotations"])


class SandboxTools:
    """The MCP servers registered in one sandbox."""

    def __init__(self, sandbox_id: str, runtime: SandboxRuntime, approve: Approve) -> None:
        self._sandbox_id = sandbox_id
        self._runtime = runtime
        self._approve = approve
        self._servers: dict[str, McpServer] = {}
        self._changing = asyncio.Lock()  # one registration or removal at a time
        self._closed = False

    async def register(self, params: t.RegisterMcpServerParams) -> t.RegisterMcpServerResult:
        """Connects to the server and writes its package; one of the same name is replaced."""
        from cellboxd.mcptools.servers import McpServer  # the MCP SDK, with the first server

        if params.name in RESERVED or params.name.startswith("_"):
            raise errors.InvalidParams(
                f"Invalid params: {params.name!r} is a name of the mcptools package itself - at `$.name`"
            )
        async with self._changing:
            server = McpServer(params.name, params.server, params.approval)
            try:
                await server.start()
                if self._closed:  # the sandbox went while the server started
                    raise errors.SandboxNotFound(f"sandbox {self._sandbox_id} was destroyed")
                try:
                    package = await asyncio.to_thread(codegen.package, params.name, server.tools.values())
                except codegen.CodegenError as exc:
                    raise errors.McpServerFailed(f"MCP server {params.name!r}: {exc}", {"log": ""}) from None
                modules, tools, skipped = package
                if (old := self._servers.pop(params.name, None)) is not None:
                    await _closed(old)
                await self._remove(params.name)
                await self._write("__init__.py", RUNTIME)
                for path, source in modules.items():
                    await self._write(f"{params.name}/{path}", source)
            except BaseException:
                await asyncio.shield(_closed(server))
                raise
            self._servers[params.name] = server
        for why in skipped:
            log.warning("sandbox %s: MCP server %s: tool %s left out", self._sandbox_id, params.name, why)
        log.info("sandbox %s: MCP server %s registered, %d tools", self._sandbox_id, params.name, len(tools))
        return t.RegisterMcpServerResult(name=params.name, package=f"mcptools.{params.name}", tools=tools)

    async def unregister(self, name: str) -> None:
        async with self._changing:
            server = self._servers.pop(name, None)
            if server is None:
                raise errors.InvalidParams(
                    f"Invalid params: no MCP server {name!r} is registered in sandbox {self._sandbox_id}"
                )
            await _closed(server)
            await self._remove(name)

    async def _write(self, path: str, source: str) -> None:
        content = source.encode()
        params = t.WriteFileParams(sandbox_id=self._sandbox_id, path=f"{FOLDER}/{path}", content=content)
        await files.write(self._runtime, params, len(content))

    async def _remove(self, name: str) -> None:
        params = t.DeleteFileParams(sandbox_id=self._sandbox_id, path=f"{FOLDER}/{name}", recursive=True)
        with contextlib.suppress(errors.FileNotFound):
            await files.delete(self._runtime, params)

    async def call(self, kernel_id: str, execution: Execution | None, request: bytes) -> bytes:
        """Serves one call from a kernel: its answer. What the kernel is told of a failure says
        nothing of the server's output or address, which may hold its secrets: those go to the
        daemon's log."""
        if execution is None:
            return answer("rejected", "MCP tools can be called only from a running execution")
        try:
            call = msgspec.json.decode(request, type=_Request)
        except (msgspec.DecodeError, RecursionError) as exc:
            return answer("failed", f"a malformed call: {type(exc).__name__}")
        server = self._servers.get(call.server)
        if server is None:
            return answer("failed", f"no MCP server {call.server!r} is registered in this sandbox")
        tool = server.tools.get(call.tool)
        if tool is None:
            return answer("failed", f"the MCP server {call.server!r} has no tool {call.tool!r}")
        if server.approval == "ask":
            params = t.ApproveToolCallParams(
                sandbox_id=self._sandbox_id,
                kernel_id=kernel_id,
                execution_id=execution.execution_id,
                server=call.server,
                tool=call.tool,
                arguments=call.arguments,
            )
            with execution.holding_time():
                approved = await self._approve(params)
            if not approved:
                return answer("rejected", f"the call of {call.server}.{call.tool} was not approved")
            if self._servers.get(call.server) is not server:  # unregistered while it waited
                return answer("failed", f"the MCP server {call.server!r} was unregistered")
        try:
            result = await server.call(call.tool, call.arguments)
        except Exception as exc:
            detail = (
                f"{exc.message}\n{(exc.data or {}).get('log', '')}"
                if isinstance(exc, errors.CellboxError)
                else exc
            )
            log.warning("sandbox %s: %s.%s failed: %s", self._sandbox_id, call.server, call.tool, detail)
            return answer(
                "tool", f"the MCP server {call.server!r} failed the call (the daemon's log says why)"
            )
        return _result(tool.output_schema is not None, result)

    async def close(self) -> None:
        self._closed = True
        servers, self._servers = self._servers, {}
        await asyncio.gather(*(_closed(server) for server in servers.values()))


async def _closed(server: McpServer) -> None:
    await server.close()
    server.release()


def _result(structured: bool, result: Any) -> bytes:
    """A tool's result as the kernel gets it: its structured content where the tool declares an
    output schema, else its text (its text blocks joined, other blocks named); its images go
    along, for the cell to display."""
    parts: list[str] = []
    images: list[dict[str, str]] = []
    for block in result.content:
        text, kind = getattr(block, "text", None), getattr(block, "type", "content")
        mime, data = getattr(block, "mime_type", None), getattr(block, "data", None)
        if isinstance(text, str):
            parts.append(text)
        elif kind == "image" and isinstance(mime, str) and isinstance(data, str):
            images.append({"mime": mime, "data": data})
            parts.append(f"[an image, {mime}, displayed]")
        else:
            parts.append(f"[{kind} content]")
    text = "\n".join(parts)
    if result.is_error:
        return answer("tool", text or "the tool failed")
    value = result.structured_content if structured and result.structured_content is not None else text
    try:
        body = json.dumps({"ok": True, "result": value, "images": images}).encode()
    except (TypeError, ValueError) as exc:
        return answer("failed", f"the tool's result cannot be passed on: {exc}")
    if len(body) > RESULT_CAP:
        return answer("failed", f"the tool's result takes more than {RESULT_CAP >> 20} MiB")
    return body
