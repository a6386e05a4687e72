"""`cellbox mcp`: cellbox's kernels as the tools of an MCP server, for agents.

The server is a client of a `cellbox serve` it starts as its child (through `AsyncClient`).
Each MCP session gets a sandbox of its own, made at its first tool call, and a kernel in it,
started at the first `execute_python`; both are destroyed when the session ends or the server
stops. A server that is killed leaves nothing either: its daemon's input ends with it, and a
daemon whose input ends removes every sandbox it made.

Only the MCP versions with the `initialize` handshake are served (2025-11-25 and before):
2026-07-28 has no sessions, and a kernel's state has to live in one. Clients that try the
newer version first are told so and fall back to the handshake.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import dataclasses
import hmac
import mimetypes
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import mcp_types as mt
import uvicorn
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.runner import serve_loop
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cellbox import __version__
from cellbox import types as t
from cellbox.client import AsyncClient, AsyncKernel, AsyncSandbox
from cellbox.errors import (
    CellboxError,
    InstallFailed,
    KernelDied,
    KernelNotFound,
    RequestFailed,
    SandboxNotFound,
)
from cellboxd import mcpconfig
from cellboxd.mcpconfig import ConfiguredServer
from cellboxd.mcptools import preview

_DAEMON: Final = [sys.executable, "-m", "cellboxd", "serve", "--log-level", "warning"]
_SESSION_KEY: Final = "cellbox.session"  # the session's entry in its connection's state
_IMAGE_TYPES: Final = ("image/png", "image/jpeg", "image/gif", "image/webp")
_IMAGE_FILE_LIMIT: Final = 16 << 20  # bytes of an image file read_file returns as an image
_MAX_TIMEOUT: Final = 3600.0
_APPROVAL_ARGUMENTS_CHARS: Final = 2000


class UsageError(Exception):
    """A bad option or config file: `cellbox mcp` says why and exits 2."""


# --- options and the MCP config file -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """What each session's sandbox is made of, and how the tools answer."""

    max_output_chars: int
    backend: t.Backend | None = None
    image: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    limits: t.Limits | None = None
    network: t.Network | None = None
    approve: bool = False  # approve every tool call of a `mcp_servers` server without asking
    mcp_servers: Mapping[str, ConfiguredServer] = dataclasses.field(default_factory=dict)


def _address(text: str) -> tuple[str, int]:
    """`--http`'s `[HOST:]PORT`; HOST is loopback unless given, `[::1]` for IPv6."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--http: expected [HOST:]PORT, e.g. 127.0.0.1:8000, not {text!r}")
    return host, int(port)


def _token(path: str | None) -> tuple[str, bool]:
    """The bearer token, and whether it was generated (and so must be shown)."""
    if path is None:
        return secrets.token_urlsafe(32), True
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the token file {path}: {e}") from e
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"the token file {path} must hold one token, without spaces")
    return token, False


# --- the tools' arguments ----------------------------------------------------------------


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Execute(_Arguments):
    code: str = Field(description="Python code, IPython syntax (`!pip ...`, `%time ...`, top-level `await`).")
    timeout: float = Field(
        120.0,
        gt=0,
        le=_MAX_TIMEOUT,
        description="Seconds before the kernel is interrupted (KeyboardInterrupt); its state stays.",
    )


class _Install(_Arguments):
    packages: list[str] = Field(
        min_length=1, description="Requirements as pip takes them, e.g. ['requests', 'pandas>=2.2']."
    )


class _Sources(_Arguments):
    modules: list[str] = Field(min_length=1, description="Dotted module names, e.g. ['json.decoder'].")


class _ReadFile(_Arguments):
    path: str = Field(description="A path relative to the workspace, e.g. 'data/results.csv'.")


class _WriteFile(_Arguments):
    path: str = Field(description="A path relative to the workspace; missing folders are made.")
    content: str = Field(description="The file's whole new content, as text (written as UTF-8).")


class _ListFiles(_Arguments):
    path: str = Field(".", description="A folder relative to the workspace; '.' is the workspace.")


class _NoArguments(_Arguments):
    pass


@dataclasses.dataclass(frozen=True)
class _Tool:
    arguments: type[_Arguments]
    description: str
    run: Callable[[_Session, ServerRequestContext[Any, Any], Any], Awaitable[mt.CallToolResult]]
    read_only: bool = False

    def listing(self, name: str) -> mt.Tool:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for field in schema.get("properties", {}).values():
            field.pop("title", None)
        return mt.Tool(
            name=name,
            description=self.description,
            input_schema=schema,
            annotations=mt.ToolAnnotations(read_only_hint=self.read_only),
        )


# --- results -----------------------------------------------------------------------------


def _result(text: str, *images: mt.ImageContent, error: bool = False) -> mt.CallToolResult:
    return mt.CallToolResult(content=[mt.TextContent(type="text", text=text), *images], is_error=error)


def _cap(text: str, limit: int) -> str:
    """`text`, or its beginning and end with a note of what was cut between them."""
    if len(text) <= limit:
        return text
    half = limit // 2
    cut = len(text) - 2 * half
    note = f"\n[... {cut:,} characters cut here: the output had {len(text):,}, more than {limit:,} ...]\n"
    return text[:half] + note + text[-half:]


def _execute_result(result: t.ExecuteResult, timeout: float, limit: int) -> mt.CallToolResult:
    parts = [result.text]
    images: list[mt.ImageContent] = []
    for output in result.outputs:
        mimetype = next((m for m in _IMAGE_TYPES if isinstance(output.data.get(m), str)), None)
        if mimetype is not None:
            images.append(mt.ImageContent(type="image", data=output.data[mimetype], mime_type=mimetype))
        plain = output.data.get("text/plain")
        if output.file is not None:
            parts.append(f"[display saved as {output.file}]")
        elif isinstance(plain, str) and plain not in result.text:  # a display's text: not in `text`
            parts.append(plain)
    if result.truncated:
        parts.append("[the output was longer than the daemon keeps: some of it was left out]")
    error = result.error
    if result.status == "error" and error is not None:
        parts.append("\n".join(error.traceback) or f"{error.ename}: {error.evalue}")
    elif result.status == "timeout":  # the daemon's evalue says whether the kernel was restarted
        reason = error.evalue if error is not None and error.evalue else f"not done within {timeout:g} s"
        parts.append(f"[timeout: {reason}]")
    elif result.status == "died":
        parts.append("[the kernel died, its state is lost: the next execute_python starts a fresh one]")
    elif result.status == "cancelled":
        parts.append("[cancelled: the kernel was interrupted]")
    text = "\n".join(part.rstrip("\n") for part in parts if part) or "[no output]"
    return _result(_cap(text, limit), *images, error=result.status != "ok")


def _decode(data: bytes, complete: bool) -> str | None:
    """`data` as UTF-8 text (a character cut at its end is dropped when it is not `complete`),
    or None when it is binary."""
    if b"\0" in data:
        return None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError:
        return None


class _Streamer:
    """Sends an execution's output to the MCP client while it runs, up to `limit` characters:
    as progress notifications (their message the text) when the request has a progress token,
    else as log messages."""

    def __init__(self, ctx: ServerRequestContext[Any, Any], limit: int) -> None:
        self._ctx = ctx
        self._progress = ctx.meta is not None and ctx.meta.get("progress_token") is not None
        self._limit = limit
        self._sent = 0  # characters, the progress value

    async def send(self, event: t.OutputNotification) -> None:
        if self._sent >= self._limit:
            return
        text = event.text[: self._limit - self._sent]
        self._sent += len(text)
        if self._sent >= self._limit:
            text += "\n[further output is not streamed]\n"
        session = self._ctx.session
        if self._progress:
            await session.report_progress(self._sent, message=text)
        else:
            params = mt.LoggingMessageNotificationParams(level="info", logger=event.stream, data=text)
            await session.send_notification(
                mt.LoggingMessageNotification(params=params), related_request_id=self._ctx.request_id
            )


# --- sessions ----------------------------------------------------------------------------


class _Session:
    """One MCP session's sandbox and kernel, made on first use and destroyed with the session."""

    def __init__(self, app: _App) -> None:
        self._app = app
        self._lock = anyio.Lock()
        self._sandbox: AsyncSandbox | None = None
        self._kernel: AsyncKernel | None = None
        self._closed = False

    async def sandbox(self) -> AsyncSandbox:
        async with self._lock:
            if self._closed:
                raise CellboxError("the MCP session has ended")
            if self._sandbox is None:
                self._sandbox = await self._app.create_sandbox()
            return self._sandbox

    async def kernel(self) -> AsyncKernel:
        """The session's kernel: started on first use, restarted when it died."""
        sandbox = await self.sandbox()
        async with self._lock:
            if self._kernel is None:
                self._kernel = await sandbox.start_kernel()
            elif self._kernel.state == "dead":
                try:
                    await self._kernel.restart()
                except (KernelDied, KernelNotFound, SandboxNotFound, RequestFailed):
                    # the sandbox itself is gone (its container was removed, say): a new one
                    self._sandbox = self._kernel = None
                    with contextlib.suppress(CellboxError):
                        await sandbox.destroy()
                    self._sandbox = await self._app.create_sandbox()
                    self._kernel = await self._sandbox.start_kernel()
            return self._kernel

    async def restart(self) -> bool:
        """Restart the kernel; False when none was started."""
        async with self._lock:
            if self._kernel is None:
                return False
            await self._kernel.restart()
            return True

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            sandbox, self._sandbox, self._kernel = self._sandbox, None, None
        if sandbox is not None:
            with contextlib.suppress(CellboxError):  # a daemon that is gone took it along
                await sandbox.destroy()


async def _handshake_only(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Refuses requests of the protocol versions without sessions, naming those served, so
    that a client that tried them falls back to the `initialize` handshake."""
    if ctx.request_id is not None and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        data = mt.UnsupportedProtocolVersionErrorData(
            supported=list(HANDSHAKE_PROTOCOL_VERSIONS), requested=ctx.protocol_version
        )
        raise MCPError(
            code=mt.UNSUPPORTED_PROTOCOL_VERSION,
            message="cellbox keeps a kernel per MCP session: use a protocol version with the handshake",
            data=data.model_dump(mode="json"),
        )
    return await call_next(ctx)


class _App:
    """The MCP server: its tools, its sessions and its daemon."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._client: AsyncClient | None = None
        # execute_python's requests by execution id, for the approvals their cells ask for
        self._executions: dict[str, ServerRequestContext[Any, Any]] = {}
        self._tools: dict[str, _Tool] = {
            "execute_python": _Tool(_Execute, self._describe_execute(), self._execute),
            "install_packages": _Tool(
                _Install,
                "Install Python packages from PyPI into this session's sandbox. They can be imported "
                "at once in the running kernel, no restart needed, and stay until the session ends. "
                "Answers the packages installed or upgraded as name==version.",
                self._install,
            ),
            "get_skill_sources": _Tool(
                _Sources,
                "The source code of Python modules as the sandbox would import them (the standard "
                "library, installed packages, .py files of the workspace"
                + (", the mcptools.* packages" if options.mcp_servers else "")
                + "), without running them. Read a module's API here before using it.",
                self._sources,
                read_only=True,
            ),
            "read_file": _Tool(
                _ReadFile,
                "Read a file of the session's workspace (the kernel's working directory). Text comes "
                f"back as text (its first {options.max_output_chars:,} characters), a PNG, JPEG, GIF "
                "or WebP image as an image; other binary files are not shown: open them in "
                "execute_python.",
                self._read_file,
                read_only=True,
            ),
            "write_file": _Tool(
                _WriteFile,
                "Write a text file into the session's workspace (the kernel's working directory), "
                "replacing it if it exists. Code in execute_python sees it at once.",
                self._write_file,
            ),
            "list_files": _Tool(
                _ListFiles,
                "List the files and folders under a folder of the session's workspace (the kernel's "
                "working directory), recursively, with their sizes. Plots saved by execute_python "
                "are in images/.",
                self._list_files,
                read_only=True,
            ),
            "restart_kernel": _Tool(
                _NoArguments,
                "Restart the Python kernel: every variable, import and definition is lost. The "
                "workspace's files and the installed packages stay. Use it when the kernel is stuck "
                "or its state is broken.",
                self._restart,
            ),
        }
        self.server: Server[None] = Server(
            "cellbox",
            version=__version__,
            instructions=self._instructions(),
            lifespan=self._lifespan,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self.server.middleware.append(_handshake_only)

    def _instructions(self) -> str:
        text = (
            "Run Python in a sandboxed IPython kernel of cellbox's. This session has a sandbox of "
            "its own with a workspace folder (the kernel's working directory, where the file tools "
            "read and write) and a kernel whose variables persist between execute_python calls "
            "until restart_kernel or the end of the session; both are removed when it ends."
        )
        if servers := ", ".join(f"mcptools.{name}" for name in self.options.mcp_servers):
            text += (
                f" Code in the kernel can call MCP tools through the packages {servers}: one function "
                "per tool; get_skill_sources shows their signatures and docstrings."
            )
        return text

    def _describe_execute(self) -> str:
        text = (
            "Run Python code in this session's IPython kernel. Variables, imports and functions "
            "persist between calls until restart_kernel. The working directory is the session's "
            "workspace (see list_files, read_file). Answers what the code printed and the value of "
            "its last expression; each plot or image it displays (matplotlib figures too) comes back "
            "as an image and is saved in images/. At most "
            f"{self.options.max_output_chars:,} characters of output come back: write more to a file "
            "and read parts of it. An exception answers its traceback as an error."
        )
        if servers := ", ".join(f"mcptools.{name}" for name in self.options.mcp_servers):
            text += (
                f" The packages {servers} call MCP tools, one function per tool (see "
                "get_skill_sources); a call the user refuses raises mcptools.ToolCallRejected."
            )
        return text

    @contextlib.asynccontextmanager
    async def _lifespan(self, server: Server[None]) -> AsyncIterator[None]:
        self._client = await AsyncClient(_DAEMON, approve_tool_call=self._approve).start()
        try:
            yield None
        finally:
            with anyio.CancelScope(shield=True):
                await self._client.close()

    async def create_sandbox(self) -> AsyncSandbox:
        """A new sandbox of the options, with the `--mcp-config` servers registered into it."""
        assert self._client is not None, "the server has not started"
        o = self.options
        sandbox = await self._client.create_sandbox(
            o.backend, image=o.image, env=o.env, limits=o.limits, network=o.network, name="cellbox mcp"
        )
        try:
            for name, server in o.mcp_servers.items():
                try:
                    await sandbox.register_mcp_server(name, **server.registration())
                except CellboxError as e:
                    raise CellboxError(f"the MCP server {name!r} of --mcp-config failed: {e.message}") from e
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(CellboxError):
                await sandbox.destroy()
            raise
        return sandbox

    async def _approve(self, params: t.ApproveToolCallParams) -> bool:
        """Whether a cell may call a tool of a `--mcp-config` server: all may with `--approve`;
        else the MCP host's user says, asked through elicitation in the execute_python request
        that runs the cell, when the client can be asked; else none may."""
        if self.options.approve:
            return True
        ctx = self._executions.get(params.execution_id or "")
        capabilities = ctx.session.client_capabilities if ctx is not None else None
        if ctx is None or capabilities is None or capabilities.elicitation is None:
            return False
        arguments = preview(params.arguments, _APPROVAL_ARGUMENTS_CHARS)
        message = (
            f"The Python code running in cellbox wants to call the tool `{params.tool}` of the MCP "
            f"server `{params.server}` with these arguments:\n{arguments}\nAllow this call?"
        )
        schema = {
            "type": "object",
            "properties": {"approve": {"type": "boolean", "title": "Allow this tool call", "default": False}},
            "required": ["approve"],
        }
        try:
            answer = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        except Exception as e:  # a client that fails to answer has not approved
            print(f"cellbox mcp: asking to approve a tool call failed: {e!r}", file=sys.stderr)
            return False
        return answer.action == "accept" and (answer.content or {}).get("approve") is True

    # --- the MCP handlers ----------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[None], params: mt.PaginatedRequestParams | None
    ) -> mt.ListToolsResult:
        return mt.ListToolsResult(tools=[tool.listing(name) for name, tool in self._tools.items()])

    async def _call_tool(
        self, ctx: ServerRequestContext[None], params: mt.CallToolRequestParams
    ) -> mt.CallToolResult:
        tool = self._tools.get(params.name)
        if tool is None:
            raise MCPError(code=mt.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
        try:
            arguments = tool.arguments.model_validate(params.arguments or {})
        except ValidationError as e:
            return _result(f"invalid arguments for {params.name}: {e}", error=True)
        try:
            return await tool.run(self._session(ctx), ctx, arguments)
        except CellboxError as e:
            return _result(e.message, error=True)

    def _session(self, ctx: ServerRequestContext[Any, Any]) -> _Session:
        """The session of the request's MCP connection, made at its first tool call.

        Its teardown goes on the connection's exit stack, which the SDK unwinds when the
        connection ends (stdin closed, the HTTP session deleted or expired, the server stopped).
        The SDK (2.3) hands a handler its connection only inside the request's ServerSession.
        """
        connection: Connection = ctx.session._connection
        session = connection.state.get(_SESSION_KEY)
        if not isinstance(session, _Session):
            session = connection.state[_SESSION_KEY] = _Session(self)
            connection.exit_stack.push_async_callback(session.close)
        return session

    # --- the tools -----------------------------------------------------------------------

    async def _execute(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _Execute
    ) -> mt.CallToolResult:
        kernel = await session.kernel()
        streamer = _Streamer(ctx, self.options.max_output_chars)
        execution = kernel.stream(args.code, timeout=args.timeout)
        self._executions[execution.execution_id] = ctx
        try:
            async for event in execution:
                if isinstance(event, t.OutputNotification):
                    await streamer.send(event)
            result = await execution.result()
        except anyio.get_cancelled_exc_class():  # the MCP request was cancelled: so is the cell
            with anyio.CancelScope(shield=True), contextlib.suppress(CellboxError):
                await execution.cancel()
            raise
        finally:
            del self._executions[execution.execution_id]
        return _execute_result(result, args.timeout, self.options.max_output_chars)

    async def _install(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _Install
    ) -> mt.CallToolResult:
        sandbox = await session.sandbox()
        try:
            installed = await sandbox.install(args.packages)
        except InstallFailed as e:
            log = (e.data or {}).get("log") or ""
            return _result(
                _cap(f"{e.message}\n{log}".rstrip("\n"), self.options.max_output_chars), error=True
            )
        if not installed:
            return _result("Nothing to install: every requirement is already met in the sandbox.")
        lines = "\n".join(f"{package.name}=={package.version}" for package in installed)
        return _result(f"Installed, importable now:\n{lines}")

    async def _sources(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _Sources
    ) -> mt.CallToolResult:
        sandbox = await session.sandbox()
        result = await sandbox.skill_sources(args.modules)
        return _result(_cap(result.formatted, self.options.max_output_chars))

    async def _read_file(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _ReadFile
    ) -> mt.CallToolResult:
        sandbox = await session.sandbox()
        limit = self.options.max_output_chars
        mimetype, _ = mimetypes.guess_type(args.path)
        wanted = (
            _IMAGE_FILE_LIMIT if mimetype in _IMAGE_TYPES else 4 * limit
        )  # UTF-8: at most 4 bytes a character
        data = await sandbox.read_file(args.path, length=wanted + 1)
        complete = len(data) <= wanted
        if mimetype in _IMAGE_TYPES and complete:
            image = mt.ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=mimetype)
            return mt.CallToolResult(content=[image])
        text = _decode(data[:wanted], complete)
        if text is None:
            kind = f"a binary file ({mimetype})" if mimetype else "a binary file"
            return _result(f"{args.path} is {kind}, not shown: work with it in execute_python.")
        if complete and len(text) <= limit:
            return _result(text)
        return _result(
            f"{text[:limit]}\n[the file goes on: only its first {limit:,} characters are shown; read "
            "the rest in parts with execute_python]"
        )

    async def _write_file(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _WriteFile
    ) -> mt.CallToolResult:
        sandbox = await session.sandbox()
        size = await sandbox.write_file(args.path, args.content)
        return _result(f"Wrote {size:,} bytes to {args.path}.")

    async def _list_files(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _ListFiles
    ) -> mt.CallToolResult:
        sandbox = await session.sandbox()
        entries = await sandbox.list_files(args.path, recursive=True)
        lines = [
            f"{e.path}/"
            if e.kind == "dir"
            else f"{e.path} (symlink)"
            if e.kind == "symlink"
            else f"{e.path}  {e.size:,} bytes"
            for e in entries
        ]
        return _result(_cap("\n".join(lines), self.options.max_output_chars) or f"{args.path} is empty.")

    async def _restart(
        self, session: _Session, ctx: ServerRequestContext[Any, Any], args: _NoArguments
    ) -> mt.CallToolResult:
        if await session.restart():
            return _result("The kernel was restarted: its variables, imports and definitions are gone.")
        return _result("No kernel was running: the next execute_python starts a fresh one.")


# --- transports --------------------------------------------------------------------------


class _BearerAuth:
    """Answers 401 to an HTTP request without `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # not served: refused before anything reads it
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, credentials = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self._token):
                response = JSONResponse(
                    {"error": "unauthorized", "error_description": "a valid bearer token is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="cellbox"'},
                )
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _serve_stdio(server: Server[None]) -> None:
    async with server.lifespan(server) as state, stdio_server() as (read, write):
        await serve_loop(
            server, read, write, lifespan_state=state, init_options=server.create_initialization_options()
        )


async def _serve_http(server: Server[None], host: str, port: int, token: str, show_token: bool) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    if show_token:
        print(f"cellbox mcp: bearer token: {token}", file=sys.stderr, flush=True)
    print(f"cellbox mcp: serving MCP at http://{shown_host}:{bound_port}/mcp", file=sys.stderr, flush=True)
    app = _BearerAuth(server.streamable_http_app(host=host), token)
    config = uvicorn.Config(app, log_level="warning", server_header=False, timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve(sockets=[sock])


def main(args: argparse.Namespace) -> int:
    """`cellbox mcp`, from the options of its parser in cli.py."""
    try:
        limits = t.Limits(memory_mb=args.memory_mb, cpus=args.cpus, pids=args.pids)
        options = Options(
            backend=args.backend,
            image=args.image,
            env=dict(args.env),
            limits=limits if limits != t.Limits() else None,
            network=args.network,
            max_output_chars=args.max_output_chars,
            approve=args.approve,
            mcp_servers=mcpconfig.configured(args.mcp_config),
        )
        server = _App(options).server
        if args.http is None:
            if args.token_file is not None:
                raise UsageError("--token-file is for --http")
            # A signal ends the process at once (the stdin reader cannot be cancelled): the
            # daemon, its input closed, removes the sandboxes, as after a SIGKILL.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            anyio.run(_serve_stdio, server)
        else:
            host, port = _address(args.http)
            token, generated = _token(args.token_file)
            anyio.run(_serve_http, server, host, port, token, generated)
    except (UsageError, mcpconfig.McpConfigError) as e:
        print(f"cellbox: {e}", file=sys.stderr)
        return 2
    return 0
