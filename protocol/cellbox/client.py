"""The Python client of the cellbox daemon, as async and sync twins.

`AsyncClient` spawns `cellbox serve`, speaks the protocol on its stdin and stdout, and hands
out `AsyncSandbox` and `AsyncKernel` objects. `Client`, `Sandbox` and `Kernel` are the same
API for synchronous code: they run an `AsyncClient` on an event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, Self, TypeVar

import msgspec

from cellbox import methods
from cellbox import types as t
from cellbox.errors import CellboxError, InvalidParams, RequestCancelled, TransportError, error_from_response

__all__ = [
    "AsyncClient",
    "AsyncExecution",
    "AsyncKernel",
    "AsyncSandbox",
    "Client",
    "Execution",
    "ExecutionEvent",
    "Kernel",
    "Sandbox",
    "ServerInfo",
    "default_command",
]

T = TypeVar("T")

ExecutionEvent = t.OutputNotification | t.DisplayNotification
"""What iterating over an execution yields, in the order the kernel produced it."""

ProgressCallback = Callable[[str], None]
ApprovalCallback = Callable[[t.ApproveToolCallParams], "bool | Awaitable[bool]"]
"""Answers the daemon's `cellbox/approveToolCall`: True runs the tool call. A plain function
runs in a worker thread (it may block, asking a person); a coroutine function on the loop."""
LogLevel = Literal["debug", "info", "warning", "error"]

_SHUTDOWN_TIMEOUT: Final = 30.0  # seconds for `shutdown` to stop every kernel and sandbox
_FILE_PIECE: Final = 8 << 20  # bytes per readFile or writeFile, unless the daemon says less
_EXIT_TIMEOUT: Final = 5.0  # seconds for the daemon to exit after `exit` before it is killed
_STREAM_LIMIT: Final = 1 << 20  # longest header line the reader accepts


class ServerInfo(msgspec.Struct):
    """`serverInfo` of the `initialize` result."""

    name: str
    version: str | None = None


class _Experimental(msgspec.Struct):
    cellbox: t.CellboxCapabilities


class _ServerCapabilities(msgspec.Struct):
    experimental: _Experimental


class _InitializeResult(msgspec.Struct, rename="camel"):
    capabilities: _ServerCapabilities
    server_info: ServerInfo


class _ResponseError(msgspec.Struct):
    code: int
    message: str
    data: Any = None


class _Message(msgspec.Struct):
    """Any incoming JSON-RPC message; `params` and `result` are decoded once their type is known."""

    id: int | str | None = None
    method: str | None = None
    params: msgspec.Raw = msgspec.Raw(b"null")
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: _ResponseError | None = None


class _ProgressParams(msgspec.Struct):
    token: int | str
    value: dict[str, Any]


class _LogMessageParams(msgspec.Struct):
    message: str


_RESULT_TYPES: Final[dict[str, type[Any] | None]] = {
    "initialize": _InitializeResult,
    **{method: result for method, (_, result) in methods.REQUESTS.items()},
}
_encoder = msgspec.json.Encoder()


def default_command() -> list[str]:
    """`cellbox serve` when `cellbox` is on PATH, else the daemon module of this interpreter."""
    # warnings and errors only on stderr: scripts stay quiet; the daemon's log file has the rest
    if shutil.which("cellbox"):
        return ["cellbox", "serve", "--log-level", "warning"]
    return [sys.executable, "-m", "cellboxd", "serve", "--log-level", "warning"]


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The body of the next LSP base-protocol frame, or None when the stream has ended."""
    length: int | None = None
    while True:
        line = await reader.readline()
        if not line:
            return None
        line = line.strip()
        if not line:
            if length is None:
                raise TransportError("the daemon sent a message without Content-Length")
            return await reader.readexactly(length)
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise TransportError(f"the daemon sent a bad Content-Length: {value!r}") from None


def _local_files(root: Path) -> list[tuple[tuple[str, ...], int]]:
    """The files to upload from `root` (a file, or a folder's regular files, symlinks not
    followed): each one's path under `root` as parts (empty for `root` itself) and its mode."""
    if not root.is_dir():
        return [((), stat.S_IMODE(root.stat().st_mode))]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder, name)
            if not path.is_symlink() and path.is_file():
                found.append((path.relative_to(root).parts, stat.S_IMODE(path.stat().st_mode)))
    return found


def _write_local(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _strings(items: str | Iterable[str]) -> list[str]:
    return [items] if isinstance(items, str) else list(items)


class AsyncClient:
    """A connection to a cellbox daemon that this client starts and stops.

    Use it as `async with AsyncClient() as client:`, or call `start()` and `close()`.
    `command` overrides the daemon command (see `default_command`), `env` adds variables to
    its environment, and `stderr` is where its logs go (inherited by default; a file or
    `subprocess.DEVNULL` also work). `default_backend`, `data_dir`, `log_level` and `pool` are
    sent as `initializationOptions`; `pool` (e.g. `[PoolSpec("local", size=2)]`) keeps that many
    sandboxes ready, each with a kernel started, so that a sandbox and its first kernel come at
    once. `on_log` receives the daemon's `window/logMessage` texts. `approve_tool_call` answers
    the daemon's requests to approve a call of an MCP server's tool (see ApprovalCallback);
    without it every such call is refused.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        default_backend: t.Backend | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        log_level: LogLevel | None = None,
        pool: Sequence[t.PoolSpec] | None = None,
        env: Mapping[str, str] | None = None,
        stderr: int | IO[Any] | None = None,
        on_log: Callable[[str], None] | None = None,
        approve_tool_call: ApprovalCallback | None = None,
    ) -> None:
        self._command = list(command) if command is not None else default_command()
        self._options = t.InitializationOptions(
            default_backend=default_backend,
            data_dir=os.fspath(data_dir) if data_dir is not None else None,
            log_level=log_level,
            pool=list(pool) if pool is not None else None,
        )
        self._env = {**os.environ, **env} if env is not None else None
        self._stderr = stderr
        self._on_log = on_log
        self._approve = approve_tool_call
        self._approvals: dict[int | str, asyncio.Task[None]] = {}  # questions not answered yet
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int | str, tuple[str, asyncio.Future[Any]]] = {}
        self._closed: str | None = None  # why no more requests can be sent
        self._listeners: dict[str, list[Callable[[Any], None]]] = {}
        self._executions: dict[str, asyncio.Queue[ExecutionEvent | None]] = {}
        self._progress: dict[str, ProgressCallback] = {}
        self._kernel_states: dict[str, t.KernelState] = {}
        self._init: _InitializeResult | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        """Start the daemon and initialize the session; TransportError if that fails."""
        if self._process is not None:
            raise RuntimeError("the client has already been started")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=self._env,
                limit=_STREAM_LIMIT,
                # Out of the terminal's process group: Ctrl-C reaches the client, which cancels.
                start_new_session=True,
            )
        except OSError as e:
            raise TransportError(f"cannot start the cellbox daemon `{shlex.join(self._command)}`: {e}") from e
        self._tasks = [asyncio.create_task(self._read_messages()), asyncio.create_task(self._watch_process())]
        try:
            init: _InitializeResult = await self.request(
                "initialize",
                {
                    "processId": os.getpid(),
                    "clientInfo": {"name": "cellbox-python"},
                    "capabilities": {"window": {"workDoneProgress": True}},
                    "initializationOptions": self._options,
                },
            )
            if init.capabilities.experimental.cellbox.protocol_version != t.PROTOCOL_VERSION:
                raise CellboxError(
                    f"the daemon speaks cellbox protocol version "
                    f"{init.capabilities.experimental.cellbox.protocol_version}, "
                    f"this client speaks version {t.PROTOCOL_VERSION}"
                )
            self._init = init
            self._notify("initialized", {})
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Shut the daemon down (`shutdown`, then `exit`), killing it if it does not exit in time."""
        process = self._process
        if process is None:
            return
        try:
            if self._closed is None:
                with contextlib.suppress(CellboxError, TimeoutError):
                    await asyncio.wait_for(self.request("shutdown"), _SHUTDOWN_TIMEOUT)
                with contextlib.suppress(CellboxError):
                    self._notify("exit")
                self._shut("the client is closed")
                if process.stdin is not None:
                    process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), _EXIT_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        finally:
            self._shut("the client is closed")
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pid(self) -> int:
        """The process id of the daemon."""
        if self._process is None:
            raise RuntimeError("the client has not been started")
        return self._process.pid

    @property
    def server_info(self) -> ServerInfo:
        return self._initialized().server_info

    @property
    def capabilities(self) -> t.CellboxCapabilities:
        """`capabilities.experimental.cellbox`: protocol version, backends, default backend."""
        return self._initialized().capabilities.experimental.cellbox

    def _file_piece(self) -> int:
        return min(self.capabilities.file_cap or _FILE_PIECE, _FILE_PIECE)

    def _initialized(self) -> _InitializeResult:
        if self._init is None:
            raise RuntimeError("the client has not been started")
        return self._init

    # --- the protocol --------------------------------------------------------------------

    async def request(self, method: str, params: Any = None) -> Any:
        """Send a request and return its result, decoded into its type from `methods.REQUESTS`.

        `params` is a struct of `cellbox.types` or any JSON-encodable value. An error answer
        raises its `CellboxError` subclass. Cancelling the awaiting task sends `$/cancelRequest`.
        """
        return await self._wait(*self._send_request(method, params))

    def on_notification(self, method: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call `callback` with the params of every `method` notification; returns the unsubscriber.

        Params of the notifications in `methods.NOTIFICATIONS` are decoded into their struct.
        Callbacks run in the client's event loop and must not block it.
        """
        self._listeners.setdefault(method, []).append(callback)
        return lambda: self._listeners[method].remove(callback)

    def _send_request(self, method: str, params: Any) -> tuple[int, asyncio.Future[Any]]:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self._write(message)
        self._pending[request_id] = (method, future)
        return request_id, future

    async def _wait(self, request_id: int, future: asyncio.Future[Any]) -> Any:
        try:
            await self._drain()
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(request_id, None) is not None:
                self._cancel_request(request_id)
            raise
        except TransportError:  # from the drain: the future will not be awaited
            self._pending.pop(request_id, None)
            raise

    def _cancel_request(self, request_id: int) -> None:
        with contextlib.suppress(TransportError):
            self._notify("$/cancelRequest", {"id": request_id})

    def _notify(self, method: str, params: Any = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._write(message)

    def _write(self, message: dict[str, Any]) -> None:
        if self._process is None:
            raise RuntimeError("the client has not been started")
        if self._closed is not None:
            raise TransportError(self._closed)
        assert self._process.stdin is not None
        body = _encoder.encode(message)
        self._process.stdin.write(b"Content-Length: %d\r\n\r\n%b" % (len(body), body))

    async def _drain(self) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            await self._process.stdin.drain()
        except ConnectionError as e:
            raise TransportError(f"cannot write to the cellbox daemon: {e}") from e

    def _shut(self, reason: str) -> None:
        """Refuse new requests and fail the pending ones with TransportError(reason)."""
        if self._closed is None:
            self._closed = reason
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            if not future.done():
                future.set_exception(TransportError(reason))

    async def _watch_process(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        self._shut(f"the cellbox daemon exited with code {code}")

    async def _read_messages(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        reason = "the cellbox daemon closed its output"
        try:
            while (body := await _read_frame(self._process.stdout)) is not None:
                self._dispatch(msgspec.json.decode(body, type=_Message))
            # The daemon is likely exiting: give the watcher a moment to report its exit code.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), 1.0)
        except (TransportError, msgspec.DecodeError, asyncio.IncompleteReadError, ValueError) as e:
            reason = f"bad message from the cellbox daemon: {e}"
        finally:
            self._shut(reason)

    def _dispatch(self, message: _Message) -> None:
        if message.method is None:
            if message.id is not None:
                self._on_response(message)
        elif message.id is None:
            self._on_notification(message.method, message.params)
        elif message.method == methods.APPROVE_TOOL_CALL:
            request_id = message.id
            task = asyncio.create_task(self._answer_approval(request_id, message.params))
            self._tasks.append(task)
            self._approvals[request_id] = task
            task.add_done_callback(self._tasks.remove)
            task.add_done_callback(lambda _: self._approvals.pop(request_id, None))
        else:  # a request from the daemon (workDoneProgress/create, registerCapability...)
            with contextlib.suppress(TransportError):
                self._write({"jsonrpc": "2.0", "id": message.id, "result": None})

    async def _answer_approval(self, request_id: int | str, raw: msgspec.Raw) -> None:
        """Answers `cellbox/approveToolCall` with the callback's word; a client without one says
        -32601, which the daemon takes for a refusal, and so is a callback that fails."""
        answer: dict[str, Any]
        if self._approve is None:
            answer = {"error": {"code": -32601, "message": "this client approves no tool calls"}}
        else:
            try:
                params = msgspec.json.decode(raw, type=t.ApproveToolCallParams)
                if asyncio.iscoroutinefunction(self._approve):
                    approved = await self._approve(params)
                else:
                    approved = await asyncio.to_thread(self._approve, params)
                    if isinstance(approved, Awaitable):
                        approved = await approved
                answer = {"result": t.ApproveToolCallResult(approved=approved is True)}
            except asyncio.CancelledError:  # the daemon withdrew the question
                answer = {"error": {"code": -32800, "message": "the daemon withdrew the question"}}
            except Exception as e:
                answer = {"error": {"code": -32603, "message": f"the approval callback failed: {e!r}"}}
        with contextlib.suppress(TransportError):
            self._write({"jsonrpc": "2.0", "id": request_id, **answer})

    def _on_response(self, message: _Message) -> None:
        assert message.id is not None
        method, future = self._pending.pop(message.id, (None, None))
        if future is None or future.done():
            return
        if message.error is not None:
            error = message.error
            future.set_exception(error_from_response(error.code, error.message, error.data))
            return
        result_type = _RESULT_TYPES.get(method or "")
        try:
            if result_type is None:
                future.set_result(msgspec.json.decode(message.result))
            else:
                future.set_result(msgspec.json.decode(message.result, type=result_type))
        except msgspec.ValidationError as e:
            future.set_exception(CellboxError(f"the daemon answered {method} with a bad result: {e}"))

    def _on_notification(self, method: str, raw: msgspec.Raw) -> None:
        try:
            params_type = methods.NOTIFICATIONS.get(method)
            params: Any = (
                msgspec.json.decode(raw, type=params_type) if params_type else msgspec.json.decode(raw)
            )
            if isinstance(params, t.OutputNotification | t.DisplayNotification):
                queue = self._executions.get(params.execution_id)
                if queue is not None:
                    queue.put_nowait(params)
            elif isinstance(params, t.KernelStatusNotification):
                self._kernel_states[params.kernel_id] = params.state
            elif method == "$/progress":
                progress = msgspec.convert(params, _ProgressParams)
                on_progress = self._progress.get(str(progress.token))
                message = progress.value.get("message")
                if on_progress is not None and isinstance(message, str):
                    on_progress(message)
            elif method == "$/cancelRequest" and isinstance(params, dict):
                request_id = params.get("id")
                if isinstance(request_id, int | str) and (withdrawn := self._approvals.get(request_id)):
                    withdrawn.cancel()
            elif method == "window/logMessage" and self._on_log is not None:
                self._on_log(msgspec.convert(params, _LogMessageParams).message)
            for listener in list(self._listeners.get(method, ())):
                listener(params)
        except Exception as e:  # a bad notification or a failing callback must not stop the reader
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"cellbox client: error handling a {method} notification", "exception": e}
            )

    @contextlib.contextmanager
    def _progress_token(self, on_progress: ProgressCallback | None) -> Iterator[str | None]:
        """A fresh workDoneToken routed to `on_progress`, or None when there is no callback."""
        if on_progress is None:
            yield None
            return
        token = uuid.uuid4().hex
        self._progress[token] = on_progress
        try:
            yield token
        finally:
            del self._progress[token]

    # --- sandboxes -----------------------------------------------------------------------

    async def create_sandbox(
        self,
        backend: t.Backend | None = None,
        *,
        image: str | None = None,
        env: Mapping[str, str] | None = None,
        mounts: Sequence[t.Mount] = (),
        limits: t.Limits | None = None,
        network: t.Network | None = None,
        name: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox (the daemon's default backend unless `backend` is given)."""
        with self._progress_token(on_progress) as token:
            info: t.CreateSandboxResult = await self.request(
                methods.CREATE_SANDBOX,
                t.CreateSandboxParams(
                    backend=backend,
                    image=image,
                    env=dict(env or {}),
                    mounts=list(mounts),
                    limits=limits,
                    network=network,
                    name=name,
                    work_done_token=token,
                ),
            )
        return AsyncSandbox(self, info)

    async def list_sandboxes(self) -> list[t.SandboxInfo]:
        result: t.ListSandboxesResult = await self.request(methods.LIST_SANDBOXES, t.ListSandboxesParams())
        return result.sandboxes

    async def pool_status(self) -> list[t.PoolStatus]:
        """The warm pool: per backend and image, how many sandboxes it keeps and how many are ready."""
        result: t.ListSandboxesResult = await self.request(methods.LIST_SANDBOXES, t.ListSandboxesParams())
        return result.pool

    # --- images --------------------------------------------------------------------------

    async def build_image(
        self,
        *,
        variant: t.Variant | None = None,
        dependencies: str | None = None,
        tag: str | None = None,
        base_image: str | None = None,
        root: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> t.BuildImageResult:
        """Build a docker image, unless an identical one has the tag; `on_progress` gets its output lines.

        Give a built-in `variant` or the text of a dependency file, not both; neither is "minimal".
        """
        with self._progress_token(on_progress) as token:
            result: t.BuildImageResult = await self.request(
                methods.BUILD_IMAGE,
                t.BuildImageParams(
                    tag=tag,
                    variant=variant,
                    dependencies=dependencies,
                    base_image=base_image,
                    root=root,
                    work_done_token=token,
                ),
            )
        return result

    async def list_images(self) -> list[t.ImageInfo]:
        result: t.ListImagesResult = await self.request(methods.LIST_IMAGES, t.ListImagesParams())
        return result.images


class AsyncSandbox:
    """A sandbox of the daemon; `async with` destroys it on exit."""

    def __init__(self, client: AsyncClient, info: t.CreateSandboxResult) -> None:
        self.client = client
        self.info = info
        self._destroyed = False

    @property
    def sandbox_id(self) -> str:
        return self.info.sandbox_id

    @property
    def backend(self) -> t.Backend:
        return self.info.backend

    @property
    def workspace(self) -> str | None:
        """The workspace's folder on this machine, where this machine can see it (the local
        backend); None where it cannot (docker). Use the file methods for either."""
        return self.info.workspace

    @property
    def sandbox_workspace(self) -> str:
        """The workspace as the sandbox's kernels see it: their working directory."""
        return self.info.sandbox_workspace

    async def start_kernel(self, name: str | None = None) -> AsyncKernel:
        result: t.StartKernelResult = await self.client.request(
            methods.START_KERNEL, t.StartKernelParams(sandbox_id=self.sandbox_id, name=name)
        )
        return AsyncKernel(self.client, result.kernel_id, result.sandbox_id)

    async def install(
        self,
        packages: str | Iterable[str],
        *,
        upgrade: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> list[t.InstalledPackage]:
        """Install PEP 508 requirements into the sandbox; `on_progress` gets the installer's lines."""
        with self.client._progress_token(on_progress) as token:
            result: t.InstallPackageResult = await self.client.request(
                methods.INSTALL_PACKAGE,
                t.InstallPackageParams(
                    sandbox_id=self.sandbox_id,
                    packages=_strings(packages),
                    upgrade=upgrade,
                    work_done_token=token,
                ),
            )
        return result.installed

    async def skill_sources(self, modules: str | Iterable[str]) -> t.GetSkillSourcesResult:
        """The sources of modules as the sandbox's interpreter resolves them, without running them."""
        result: t.GetSkillSourcesResult = await self.client.request(
            methods.GET_SKILL_SOURCES,
            t.GetSkillSourcesParams(sandbox_id=self.sandbox_id, modules=_strings(modules)),
        )
        return result

    async def register_mcp_server(
        self,
        name: str,
        *,
        command: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        approval: t.Approval = "ask",
    ) -> t.RegisterMcpServerResult:
        """Make an MCP server's tools the package `mcptools.<name>` in the sandbox: a stdio server
        the daemon runs (`command`, `args`, `env`, `cwd`) or one over streamable HTTP (`url`,
        `headers`). Its process, `env` and `headers` stay on the daemon's side. With
        `approval="ask"` each call waits for the client's `approve_tool_call`."""
        spec = t.McpServerSpec(
            command=command,
            args=list(args),
            env=dict(env or {}),
            cwd=cwd,
            url=url,
            headers=dict(headers or {}),
        )
        result: t.RegisterMcpServerResult = await self.client.request(
            methods.REGISTER_MCP_SERVER,
            t.RegisterMcpServerParams(sandbox_id=self.sandbox_id, name=name, server=spec, approval=approval),
        )
        return result

    async def unregister_mcp_server(self, name: str) -> None:
        """Stop the server and remove `mcptools.<name>` from the sandbox."""
        await self.client.request(
            methods.UNREGISTER_MCP_SERVER, t.UnregisterMcpServerParams(sandbox_id=self.sandbox_id, name=name)
        )

    # --- files ---------------------------------------------------------------------------

    async def write_file(
        self, path: str, content: bytes | str, *, append: bool = False, mode: int | None = None
    ) -> int:
        """Write `content` (str is UTF-8) to `path`, relative to the workspace, making missing
        folders; in pieces when it is larger than the daemon takes at once. `mode` is the
        file's permission bits (e.g. 0o755). Returns the file's size."""
        data = content.encode() if isinstance(content, str) else bytes(content)
        piece = self.client._file_piece()
        size = 0
        for start in range(0, max(len(data), 1), piece):
            result: t.WriteFileResult = await self.client.request(
                methods.WRITE_FILE,
                t.WriteFileParams(
                    sandbox_id=self.sandbox_id,
                    path=path,
                    content=data[start : start + piece],
                    append=append or start > 0,
                    mode=mode if start == 0 else None,
                ),
            )
            size = result.size
        return size

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """The content of `path` (from `offset`, at most `length` bytes; all of it by default),
        read in as many pieces as the daemon's cap asks. FileNotFound when it is not there."""
        chunks: list[bytes] = []
        read = 0
        while length is None or read < length:
            result: t.ReadFileResult = await self.client.request(
                methods.READ_FILE,
                t.ReadFileParams(
                    sandbox_id=self.sandbox_id,
                    path=path,
                    offset=offset + read,
                    length=None if length is None else length - read,
                ),
            )
            chunks.append(result.content)
            read += len(result.content)
            if result.eof or not result.content:
                break
        return b"".join(chunks)

    async def list_files(self, path: str = ".", *, recursive: bool = False) -> list[t.FileEntry]:
        """The entries of a folder of the workspace (its whole tree with `recursive`)."""
        result: t.ListFilesResult = await self.client.request(
            methods.LIST_FILES, t.ListFilesParams(sandbox_id=self.sandbox_id, path=path, recursive=recursive)
        )
        return result.entries

    async def delete_file(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, a symlink or (with `recursive`) a folder of the workspace."""
        await self.client.request(
            methods.DELETE_FILE,
            t.DeleteFileParams(sandbox_id=self.sandbox_id, path=path, recursive=recursive),
        )

    async def upload(self, source: str | os.PathLike[str], target: str = ".") -> None:
        """Copy a file or a folder of this machine to `target` in the workspace (a folder's
        files go under `target`, keeping their permission bits; symlinks are not followed)."""
        root = Path(source)
        for relative, mode in await asyncio.to_thread(_local_files, root):
            local = root.joinpath(*relative)
            content = await asyncio.to_thread(local.read_bytes)
            await self.write_file("/".join((target, *relative)), content, mode=mode)

    async def download(self, source: str, target: str | os.PathLike[str]) -> None:
        """Copy a file or a folder of the workspace to `target` on this machine. Only files and
        folders are made, inside `target`: symlinks in the sandbox are left out, and so is any
        entry that would land outside `target`."""
        destination = Path(target)
        try:
            entries = await self.list_files(source, recursive=True)
        except InvalidParams:  # not a folder
            await asyncio.to_thread(destination.write_bytes, await self.read_file(source))
            return
        prefix = [part for part in source.split("/") if part not in ("", ".")]
        await asyncio.to_thread(destination.mkdir, parents=True, exist_ok=True)
        for entry in entries:
            parts = entry.path.split("/")
            relative = parts[len(prefix) :]
            if parts[: len(prefix)] != prefix or not relative or any(p in ("", ".", "..") for p in relative):
                continue
            local = destination.joinpath(*relative)
            if entry.kind == "dir":
                await asyncio.to_thread(local.mkdir, parents=True, exist_ok=True)
            elif entry.kind == "file":
                content = await self.read_file(entry.path)
                await asyncio.to_thread(_write_local, local, content)

    async def destroy(self) -> None:
        """Destroy the sandbox and its kernels; a second call does nothing."""
        if not self._destroyed:
            await self.client.request(
                methods.DESTROY_SANDBOX, t.DestroySandboxParams(sandbox_id=self.sandbox_id)
            )
            self._destroyed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(TransportError):  # the daemon is gone, and its sandboxes with it
            await self.destroy()


class AsyncKernel:
    """An IPython kernel in a sandbox; `async with` shuts it down on exit."""

    def __init__(self, client: AsyncClient, kernel_id: str, sandbox_id: str) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self.sandbox_id = sandbox_id
        self._shut_down = False

    @property
    def state(self) -> t.KernelState | None:
        """The last state the daemon reported in `cellbox/kernelStatus`, None before the first."""
        return self.client._kernel_states.get(self.kernel_id)

    async def execute(self, code: str, *, timeout: float | None = None) -> t.ExecuteResult:  # noqa: ASYNC109
        """Run `code` and return its result; cancelling the awaiting task interrupts the kernel.

        `timeout` is the daemon's: when it expires the kernel is interrupted and the result,
        status "timeout", holds what was produced so far.
        """
        result: t.ExecuteResult = await self.client.request(
            methods.EXECUTE, self._execute_params(code, timeout)
        )
        return result

    def stream(self, code: str, *, timeout: float | None = None) -> AsyncExecution:
        """Start running `code`; iterate the handle for its outputs, then await its `result()`."""
        return AsyncExecution(self.client, self._execute_params(code, timeout, uuid.uuid4().hex))

    def _execute_params(
        self, code: str, timeout: float | None, execution_id: str | None = None
    ) -> t.ExecuteParams:
        params = t.ExecuteParams(kernel_id=self.kernel_id, code=code, execution_id=execution_id)
        if timeout is not None:
            params.timeout = timeout
        return params

    async def interrupt(self) -> None:
        await self.client.request(methods.INTERRUPT_KERNEL, t.KernelParams(kernel_id=self.kernel_id))

    async def restart(self) -> None:
        """Restart the kernel: its state is cleared, its id stays."""
        await self.client.request(methods.RESTART_KERNEL, t.KernelParams(kernel_id=self.kernel_id))

    async def shutdown(self) -> None:
        """Shut the kernel down; a second call does nothing."""
        if not self._shut_down:
            await self.client.request(methods.SHUTDOWN_KERNEL, t.KernelParams(kernel_id=self.kernel_id))
            self._shut_down = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(TransportError):  # the daemon is gone, and its sandboxes with it
            await self.shutdown()


class AsyncExecution:
    """A running execution: an async iterator of its outputs and displays, in order.

    Its events are buffered from the start, so iterating late loses nothing. `await result()`
    gives the ExecuteResult; `await cancel()` cancels the execution (the kernel is interrupted)
    and gives its partial result, status "cancelled".
    """

    def __init__(self, client: AsyncClient, params: t.ExecuteParams) -> None:
        assert params.execution_id is not None
        self.execution_id = params.execution_id
        self._client = client
        self._events: asyncio.Queue[ExecutionEvent | None] = asyncio.Queue()
        self._cancel_sent = False
        client._executions[self.execution_id] = self._events
        try:
            self._request_id, future = client._send_request(methods.EXECUTE, params)
        except BaseException:
            del client._executions[self.execution_id]
            raise
        self._task = asyncio.create_task(self._run(future))
        # Its error is raised by result() and the iteration; don't also warn if neither is used.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _run(self, future: asyncio.Future[Any]) -> t.ExecuteResult:
        try:
            result: t.ExecuteResult = await self._client._wait(self._request_id, future)
            return result
        except RequestCancelled as e:
            partial = (e.data or {}).get("result")
            if self._cancel_sent and partial is not None:
                return msgspec.convert(partial, t.ExecuteResult)
            raise
        finally:
            # The daemon sends an execution's notifications before its response: none are lost.
            del self._client._executions[self.execution_id]
            self._events.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[ExecutionEvent]:
        return self

    async def __anext__(self) -> ExecutionEvent:
        event = await self._events.get()
        if event is not None:
            return event
        self._events.put_nowait(None)  # later calls end too
        await asyncio.wait([self._task])
        if not self._task.cancelled() and (error := self._task.exception()) is not None:
            raise error
        raise StopAsyncIteration

    async def result(self) -> t.ExecuteResult:
        """The result, once the daemon sends it; cancelling this wait does not cancel the execution."""
        return await asyncio.shield(self._task)

    async def cancel(self) -> t.ExecuteResult:
        """Send `$/cancelRequest`: the kernel is interrupted and the partial result returned."""
        if not self._task.done():
            self._cancel_sent = True
            self._client._cancel_request(self._request_id)
        return await self.result()


# --- the sync twin ---------------------------------------------------------------------------


class _Portal:
    """An event loop in a daemon thread, on which the sync API runs the async one.

    A callback that raises SystemExit there (rich's console does on a broken pipe) ends the
    loop: every call then raises that in its caller's thread instead of waiting forever.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="cellbox-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as exc:
            self._ended.set_exception(exc)
        else:
            self._ended.set_result(None)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the sync cellbox API cannot be called from its own callbacks")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            waits: list[concurrent.futures.Future[Any]] = [future, self._ended]
            concurrent.futures.wait(waits, return_when=concurrent.futures.FIRST_COMPLETED)
            if not future.done():
                self._ended.result()  # what ended the loop
                raise TransportError("the cellbox client's event loop stopped")
            return future.result()
        except BaseException:  # e.g. KeyboardInterrupt: cancel the coroutine too
            future.cancel()
            raise

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class Client:
    """The synchronous twin of `AsyncClient`: same arguments, same methods.

    Callbacks (`on_progress`, `on_log`, `on_notification`) run in the client's background thread,
    `approve_tool_call` in a worker thread.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        default_backend: t.Backend | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        log_level: LogLevel | None = None,
        pool: Sequence[t.PoolSpec] | None = None,
        env: Mapping[str, str] | None = None,
        stderr: int | IO[Any] | None = None,
        on_log: Callable[[str], None] | None = None,
        approve_tool_call: ApprovalCallback | None = None,
    ) -> None:
        self._async = AsyncClient(
            command,
            default_backend=default_backend,
            data_dir=data_dir,
            log_level=log_level,
            pool=pool,
            env=env,
            stderr=stderr,
            on_log=on_log,
            approve_tool_call=approve_tool_call,
        )
        self._portal: _Portal | None = None

    def start(self) -> Self:
        if self._portal is not None:
            raise RuntimeError("the client has already been started")
        self._portal = portal = _Portal()
        try:
            portal.call(self._async.start())
        except BaseException:
            self._portal = None
            portal.close()
            raise
        return self

    def close(self) -> None:
        portal, self._portal = self._portal, None
        if portal is not None:
            try:
                portal.call(self._async.close())
            finally:
                portal.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._async.pid

    @property
    def server_info(self) -> ServerInfo:
        return self._async.server_info

    @property
    def capabilities(self) -> t.CellboxCapabilities:
        return self._async.capabilities

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._portal is None:
            coro.close()
            raise RuntimeError("the client has not been started")
        return self._portal.call(coro)

    def request(self, method: str, params: Any = None) -> Any:
        return self._call(self._async.request(method, params))

    def on_notification(self, method: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        return self._async.on_notification(method, callback)

    def create_sandbox(
        self,
        backend: t.Backend | None = None,
        *,
        image: str | None = None,
        env: Mapping[str, str] | None = None,
        mounts: Sequence[t.Mount] = (),
        limits: t.Limits | None = None,
        network: t.Network | None = None,
        name: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Sandbox:
        sandbox = self._call(
            self._async.create_sandbox(
                backend,
                image=image,
                env=env,
                mounts=mounts,
                limits=limits,
                network=network,
                name=name,
                on_progress=on_progress,
            )
        )
        return Sandbox(self, sandbox)

    def list_sandboxes(self) -> list[t.SandboxInfo]:
        return self._call(self._async.list_sandboxes())

    def pool_status(self) -> list[t.PoolStatus]:
        return self._call(self._async.pool_status())

    def build_image(
        self,
        *,
        variant: t.Variant | None = None,
        dependencies: str | None = None,
        tag: str | None = None,
        base_image: str | None = None,
        root: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> t.BuildImageResult:
        return self._call(
            self._async.build_image(
                variant=variant,
                dependencies=dependencies,
                tag=tag,
                base_image=base_image,
                root=root,
                on_progress=on_progress,
            )
        )

    def list_images(self) -> list[t.ImageInfo]:
        return self._call(self._async.list_images())


class Sandbox:
    """The synchronous twin of `AsyncSandbox`; `with` destroys it on exit."""

    def __init__(self, client: Client, sandbox: AsyncSandbox) -> None:
        self.client = client
        self._async = sandbox

    @property
    def info(self) -> t.CreateSandboxResult:
        return self._async.info

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def backend(self) -> t.Backend:
        return self._async.backend

    @property
    def workspace(self) -> str | None:
        return self._async.workspace

    @property
    def sandbox_workspace(self) -> str:
        return self._async.sandbox_workspace

    def write_file(
        self, path: str, content: bytes | str, *, append: bool = False, mode: int | None = None
    ) -> int:
        return self.client._call(self._async.write_file(path, content, append=append, mode=mode))

    def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return self.client._call(self._async.read_file(path, offset=offset, length=length))

    def list_files(self, path: str = ".", *, recursive: bool = False) -> list[t.FileEntry]:
        return self.client._call(self._async.list_files(path, recursive=recursive))

    def delete_file(self, path: str, *, recursive: bool = False) -> None:
        self.client._call(self._async.delete_file(path, recursive=recursive))

    def upload(self, source: str | os.PathLike[str], target: str = ".") -> None:
        self.client._call(self._async.upload(source, target))

    def download(self, source: str, target: str | os.PathLike[str]) -> None:
        self.client._call(self._async.download(source, target))

    def start_kernel(self, name: str | None = None) -> Kernel:
        return Kernel(self.client, self.client._call(self._async.start_kernel(name)))

    def install(
        self,
        packages: str | Iterable[str],
        *,
        upgrade: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> list[t.InstalledPackage]:
        return self.client._call(self._async.install(packages, upgrade=upgrade, on_progress=on_progress))

    def skill_sources(self, modules: str | Iterable[str]) -> t.GetSkillSourcesResult:
        return self.client._call(self._async.skill_sources(modules))

    def register_mcp_server(
        self,
        name: str,
        *,
        command: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        approval: t.Approval = "ask",
    ) -> t.RegisterMcpServerResult:
        return self.client._call(
            self._async.register_mcp_server(
                name,
                command=command,
                args=args,
                env=env,
                cwd=cwd,
                url=url,
                headers=headers,
                approval=approval,
            )
        )

    def unregister_mcp_server(self, name: str) -> None:
        self.client._call(self._async.unregister_mcp_server(name))

    def destroy(self) -> None:
        self.client._call(self._async.destroy())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(TransportError):
            self.destroy()


class Kernel:
    """The synchronous twin of `AsyncKernel`; `with` shuts it down on exit."""

    def __init__(self, client: Client, kernel: AsyncKernel) -> None:
        self.client = client
        self._async = kernel

    @property
    def kernel_id(self) -> str:
        return self._async.kernel_id

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def state(self) -> t.KernelState | None:
        return self._async.state

    def execute(self, code: str, *, timeout: float | None = None) -> t.ExecuteResult:
        """Run `code` and return its result; a KeyboardInterrupt meanwhile cancels the execution."""
        return self.client._call(self._async.execute(code, timeout=timeout))

    def stream(self, code: str, *, timeout: float | None = None) -> Execution:
        """Start running `code`; iterate the handle for its outputs, then call its `result()`."""

        async def start() -> AsyncExecution:
            return self._async.stream(code, timeout=timeout)

        return Execution(self.client, self.client._call(start()))

    def interrupt(self) -> None:
        self.client._call(self._async.interrupt())

    def restart(self) -> None:
        self.client._call(self._async.restart())

    def shutdown(self) -> None:
        self.client._call(self._async.shutdown())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(TransportError):
            self.shutdown()


class Execution:
    """The synchronous twin of `AsyncExecution`: an iterator of its outputs and displays."""

    def __init__(self, client: Client, execution: AsyncExecution) -> None:
        self.client = client
        self._async = execution

    @property
    def execution_id(self) -> str:
        return self._async.execution_id

    def __iter__(self) -> Iterator[ExecutionEvent]:
        return self

    def __next__(self) -> ExecutionEvent:
        try:
            return self.client._call(self._async.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def result(self) -> t.ExecuteResult:
        return self.client._call(self._async.result())

    def cancel(self) -> t.ExecuteResult:
        return self.client._call(self._async.cancel())
