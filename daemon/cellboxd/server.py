"""The cellbox daemon: a pygls server whose handlers decode params and call the owning module."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from cellbox import __version__, errors, methods
from cellbox import types as t
from cellboxd import backends, config, documents, files, logs, packages, skills
from cellboxd.backends.docker import DockerBackend
from cellboxd.config import Settings
from cellboxd.kernels import Kernel
from cellboxd.progress import WorkDone
from cellboxd.sandboxes import SandboxManager
from cellboxd.transport import CellboxProtocol, Writer, open_stdio, read_frames

log = logging.getLogger(__name__)

_TEARDOWN_SECONDS = 4.0


class CellboxServer(LanguageServer):
    protocol: CellboxProtocol

    def __init__(self, settings: Settings) -> None:
        super().__init__("cellbox", __version__, protocol_cls=CellboxProtocol)
        self.settings = settings  # what the command line said; `initialize` may add to it
        self._daemon_id = uuid.uuid4().hex
        # made by `initialize`, once every setting is known (no request comes before it)
        self._sandboxes: SandboxManager | None = None
        self._docker: DockerBackend | None = None
        self.protocol.on_initialize = self._on_initialize

        self._shutting_down: asyncio.Task[Any] | None = None

        async def on_shutdown(*_: Any) -> None:
            self._shutting_down = asyncio.current_task()
            if self._sandboxes is not None:
                await self._sandboxes.close_all()

        self.feature(lsp.SHUTDOWN)(on_shutdown)
        self._client_log: logs.ClientLogHandler | None = None
        handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            methods.CREATE_SANDBOX: self.create_sandbox,
            methods.LIST_SANDBOXES: self.list_sandboxes,
            methods.DESTROY_SANDBOX: self.destroy_sandbox,
            methods.START_KERNEL: self.start_kernel,
            methods.SHUTDOWN_KERNEL: self.shutdown_kernel,
            methods.INTERRUPT_KERNEL: self.interrupt_kernel,
            methods.RESTART_KERNEL: self.restart_kernel,
            methods.EXECUTE: self.execute,
            methods.INSTALL_PACKAGE: self.install_package,
            methods.GET_SKILL_SOURCES: self.get_skill_sources,
            methods.BUILD_IMAGE: self.build_image,
            methods.LIST_IMAGES: self.list_images,
            methods.BIND_DOCUMENT: self.bind_document,
            methods.WRITE_FILE: self.write_file,
            methods.READ_FILE: self.read_file,
            methods.LIST_FILES: self.list_files,
            methods.DELETE_FILE: self.delete_file,
            methods.REGISTER_MCP_SERVER: self.register_mcp_server,
            methods.UNREGISTER_MCP_SERVER: self.unregister_mcp_server,
        }
        for method, handler in handlers.items():
            self.feature(method)(_wire(method, handler))
        self.bindings = documents.Bindings()

        @self.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=["."]))
        async def completion(params: lsp.CompletionParams) -> lsp.CompletionList:
            bound = self._bound(params.text_document.uri)
            return documents.EMPTY if bound is None else await documents.complete(*bound, params.position)

        @self.feature(lsp.TEXT_DOCUMENT_HOVER)
        async def hover(params: lsp.HoverParams) -> lsp.Hover | None:
            bound = self._bound(params.text_document.uri)
            return None if bound is None else await documents.hover(*bound, params.position)

    # -- lifecycle --------------------------------------------------------------------------

    def _on_initialize(self, params: lsp.InitializeParams, result: lsp.InitializeResult) -> None:
        try:
            options = msgspec.convert(params.initialization_options or {}, t.InitializationOptions)
        except msgspec.ValidationError as exc:
            raise JsonRpcException(
                f"Invalid initializationOptions: {exc}", errors.ErrorCode.INVALID_PARAMS
            ) from None
        overrides = msgspec.structs.asdict(options)
        if any(v is not None for v in overrides.values()):
            self.settings = msgspec.structs.replace(
                self.settings, **{k: v for k, v in overrides.items() if v is not None}
            )
        if options.log_level is not None:
            logs.set_level(options.log_level)
        try:
            resolved = config.resolve(self.settings)
        except config.ConfigError as exc:
            raise JsonRpcException(str(exc), errors.ErrorCode.INVALID_PARAMS) from None
        made = backends.make(resolved, self._daemon_id)
        docker = made["docker"]
        assert isinstance(docker, DockerBackend)
        self._docker = docker
        self._sandboxes = SandboxManager(
            resolved, made, self.protocol.send_notification, self._drain, self._approve_tool_call
        )
        self._client_log = logs.attach_client(self.protocol.send_notification, self.settings.log_level)
        capabilities = t.CellboxCapabilities(
            protocol_version=t.PROTOCOL_VERSION,
            backends=self._sandboxes.backends(),
            default_backend=self.settings.default_backend,
            file_cap=self.settings.file_cap,
        )
        result.capabilities.experimental = {"cellbox": msgspec.to_builtins(capabilities)}
        # sandboxes of daemons that were killed go as soon as the next one knows its data dir
        self._sandboxes.sweep_orphans()
        self._sandboxes.configure_pool(self.settings.pool)
        log.info("initialized by %s", params.client_info.name if params.client_info else "a client")

    @property
    def sandboxes(self) -> SandboxManager:
        assert self._sandboxes is not None, "no request is served before initialize"
        return self._sandboxes

    @property
    def docker(self) -> DockerBackend:
        assert self._docker is not None, "no request is served before initialize"
        return self._docker

    async def _drain(self) -> None:
        if isinstance(writer := self.protocol.writer, Writer):
            await writer.drain()

    async def serve_stdio(self) -> int:
        loop = asyncio.get_running_loop()
        _watch_children_by_pidfd(loop)
        reader, out_fd = await open_stdio()
        stop = asyncio.Event()
        writer = await Writer.open(out_fd, on_lost=stop.set)
        self.protocol.set_writer(writer)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, stop.set)
        waits = [
            asyncio.create_task(read_frames(reader, self.protocol)),
            asyncio.create_task(self.protocol.exit_requested.wait()),
            asyncio.create_task(stop.wait()),
        ]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if self._shutting_down is not None and not stop.is_set():
            # `exit` right behind `shutdown`: shutdown finishes and is answered first (pygls
            # answers from a callback that runs before this wait's own)
            await asyncio.wait([self._shutting_down], timeout=_TEARDOWN_SECONDS)
        await self._teardown()
        writer.close()
        return 0 if self.protocol._shutdown else 1

    async def _teardown(self) -> None:
        """Ends requests in flight and stops every kernel and sandbox, within a bound."""
        if self._client_log is not None:
            logging.getLogger().removeHandler(self._client_log)
        for future in list(self.protocol._request_futures.values()):
            future.cancel()
        if self._sandboxes is None:
            return
        try:
            await asyncio.wait_for(self._sandboxes.close_all(), _TEARDOWN_SECONDS)
        except TimeoutError:
            log.error("teardown took longer than %s s", _TEARDOWN_SECONDS)

    # -- sandboxes --------------------------------------------------------------------------

    async def create_sandbox(self, params: t.CreateSandboxParams) -> t.CreateSandboxResult:
        with WorkDone(self.work_done_progress, params.work_done_token, "Creating sandbox") as progress:
            sandbox = await self.sandboxes.create(params, progress.report)
            progress.report(f"sandbox {sandbox.sandbox_id} ready")
        workspace = sandbox.runtime.workspace
        return t.CreateSandboxResult(
            sandbox_id=sandbox.sandbox_id,
            backend=sandbox.info.backend,
            sandbox_workspace=sandbox.runtime.sandbox_workspace,
            workspace=None if workspace is None else str(workspace),
            image=sandbox.info.image,
        )

    async def list_sandboxes(self, params: t.ListSandboxesParams) -> t.ListSandboxesResult:
        return t.ListSandboxesResult(self.sandboxes.list(), self.sandboxes.pool.status())

    async def destroy_sandbox(self, params: t.DestroySandboxParams) -> None:
        await self.sandboxes.destroy(params.sandbox_id)

    # -- kernels ----------------------------------------------------------------------------

    async def start_kernel(self, params: t.StartKernelParams) -> t.StartKernelResult:
        kernel = await self.sandboxes.start_kernel(params)
        return t.StartKernelResult(kernel.kernel_id, kernel.sandbox_id)

    async def shutdown_kernel(self, params: t.KernelParams) -> None:
        await self.sandboxes.shutdown_kernel(params.kernel_id)

    async def interrupt_kernel(self, params: t.KernelParams) -> None:
        await self.sandboxes.kernel(params.kernel_id).interrupt()

    async def restart_kernel(self, params: t.KernelParams) -> None:
        await self.sandboxes.kernel(params.kernel_id).restart()

    async def execute(self, params: t.ExecuteParams) -> t.ExecuteResult:
        return await self.sandboxes.kernel(params.kernel_id).execute(params)

    # -- packages, skills, images -----------------------------------------------------------

    async def install_package(self, params: t.InstallPackageParams) -> t.InstallPackageResult:
        sandbox = self.sandboxes.get(params.sandbox_id)
        title = f"Installing {' '.join(params.packages)}"
        with WorkDone(self.work_done_progress, params.work_done_token, title) as progress:
            async with sandbox.install_lock:
                installed = await packages.install(
                    sandbox.runtime,
                    params.packages,
                    upgrade=params.upgrade,
                    installer=self.settings.installer,
                    on_line=progress.report,
                )
        return t.InstallPackageResult(installed)

    async def get_skill_sources(self, params: t.GetSkillSourcesParams) -> t.GetSkillSourcesResult:
        return await skills.skill_sources(self.sandboxes.get(params.sandbox_id).runtime, params.modules)

    # -- editor features --------------------------------------------------------------------

    async def bind_document(self, params: t.BindDocumentParams) -> None:
        if params.kernel_id is not None:
            self.sandboxes.kernel(params.kernel_id)  # KernelNotFound for an unknown one
        self.bindings.bind(params.uri, params.kernel_id)

    def _bound(self, uri: str) -> tuple[Kernel, TextDocument] | None:
        """The kernel bound to an open document, and the document; None answers empty at once."""
        kernel_id = self.bindings.kernel_id(uri)
        if kernel_id is None or uri not in self.workspace.text_documents:
            return None
        try:
            kernel = self.sandboxes.kernel(kernel_id)
        except errors.KernelNotFound:
            return None
        return kernel, self.workspace.get_text_document(uri)

    async def build_image(self, params: t.BuildImageParams) -> t.BuildImageResult:
        with WorkDone(self.work_done_progress, params.work_done_token, "Building image") as progress:
            return await self.docker.build_image(params, progress.report)

    async def list_images(self, params: t.ListImagesParams) -> t.ListImagesResult:
        return t.ListImagesResult(await self.docker.list_images())

    # -- files ------------------------------------------------------------------------------

    async def write_file(self, params: t.WriteFileParams) -> t.WriteFileResult:
        runtime = self.sandboxes.get(params.sandbox_id).runtime
        return await files.write(runtime, params, self.settings.file_cap)

    async def read_file(self, params: t.ReadFileParams) -> t.ReadFileResult:
        runtime = self.sandboxes.get(params.sandbox_id).runtime
        return await files.read(runtime, params, self.settings.file_cap)

    async def list_files(self, params: t.ListFilesParams) -> t.ListFilesResult:
        return await files.list_files(self.sandboxes.get(params.sandbox_id).runtime, params)

    async def delete_file(self, params: t.DeleteFileParams) -> None:
        await files.delete(self.sandboxes.get(params.sandbox_id).runtime, params)

    # -- MCP servers' tools -----------------------------------------------------------------

    async def register_mcp_server(self, params: t.RegisterMcpServerParams) -> t.RegisterMcpServerResult:
        return await self.sandboxes.get(params.sandbox_id).tools.register(params)

    async def unregister_mcp_server(self, params: t.UnregisterMcpServerParams) -> None:
        await self.sandboxes.get(params.sandbox_id).tools.unregister(params.name)

    async def _approve_tool_call(self, params: t.ApproveToolCallParams) -> bool:
        """Asks the client; only `{approved: true}` within the approval timeout approves, and a
        client without the method (-32601) refuses. A question that is no longer asked (no
        answer in time, or the call ended) is withdrawn with `$/cancelRequest`."""
        timeout = self.settings.approval_timeout
        msg_id = uuid.uuid4().hex
        answered = False
        try:
            async with asyncio.timeout(timeout):
                answer = await self.protocol.send_request_async(
                    methods.APPROVE_TOOL_CALL, msgspec.to_builtins(params), msg_id=msg_id
                )
            answered = True
            # pygls hands a result over as a named tuple of its fields
            approved = (
                answer.get("approved") if isinstance(answer, dict) else getattr(answer, "approved", None)
            )
            if not isinstance(approved, bool):
                log.warning("a bad answer to %s: %r", methods.APPROVE_TOOL_CALL, answer)
            return approved is True
        except TimeoutError:
            log.warning("no answer to %s within %g s: refused", methods.APPROVE_TOOL_CALL, timeout)
        except JsonRpcException as exc:
            answered = True
            log.info("the client answered %s with an error: %s", methods.APPROVE_TOOL_CALL, exc)
        finally:
            if not answered:
                self.protocol._request_futures.pop(msg_id, None)
                self.protocol.send_notification(lsp.CANCEL_REQUEST, {"id": msg_id})
        return False


def _wire(method: str, handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """Decodes params into the method's msgspec type and maps cellbox errors to JSON-RPC ones."""
    params_type = methods.REQUESTS[method][0]

    @functools.wraps(handler)
    async def wired(raw: Any) -> Any:
        try:
            params = msgspec.convert({} if raw is None else raw, params_type)
        except msgspec.ValidationError as exc:
            raise JsonRpcException(
                f"Invalid params for {method}: {exc}", errors.ErrorCode.INVALID_PARAMS
            ) from None
        try:
            return await handler(params)
        except errors.CellboxError as exc:
            raise JsonRpcException(exc.message, exc.code, exc.data) from None

    return wired


def _watch_children_by_pidfd(loop: asyncio.AbstractEventLoop) -> None:
    """Python 3.11 waits for each child process (a local sandbox's agent, an ssh link) in a
    thread of its own; a pidfd in the loop costs no thread. Python 3.12 does so by itself."""
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError:  # a kernel without pidfds, or a sandbox that refuses them
            return
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)


def serve(settings: Settings) -> int:
    """Runs the daemon on stdin/stdout until `exit`, end of input or SIGTERM; the exit code."""
    logs.setup(settings)
    server = CellboxServer(settings)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(server.serve_stdio())
    return 1
