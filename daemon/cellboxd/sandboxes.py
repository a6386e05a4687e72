"""The daemon's sandboxes and their kernels: creation, lookup and teardown, on any backend."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import secrets
import shutil
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

from cellbox import errors
from cellbox import types as t
from cellboxd import inventory
from cellboxd.backends.base import Backend, Key, OnLine, SandboxRuntime
from cellboxd.channel import ChannelClosed
from cellboxd.config import Resolved
from cellboxd.execution import Execution, Notify
from cellboxd.kernels import Kernel
from cellboxd.mcptools import answer
from cellboxd.mcptools.registry import Approve, SandboxTools
from cellboxd.pool import WarmPool

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(self, info: t.SandboxInfo, runtime: SandboxRuntime, root: Path, approve: Approve) -> None:
        self.info = info
        self.runtime = runtime
        self.tools = SandboxTools(info.sandbox_id, runtime, approve)  # its MCP servers
        self.root = root  # the daemon's folder of the sandbox, whose owner file marks it as ours
        self.kernels: dict[str, Kernel] = {}
        self.spare: Kernel | None = None  # a pooled sandbox's kernel, for its first startKernel
        # serializes package installs: two pips in one environment at once corrupt it
        self.install_lock = asyncio.Lock()

    @property
    def sandbox_id(self) -> str:
        return self.info.sandbox_id

    def describe(self) -> t.SandboxInfo:
        self.info.kernels = list(self.kernels)
        return self.info


class SandboxManager:
    def __init__(
        self,
        resolved: Resolved,
        backends: dict[t.Backend, Backend],
        notify: Notify,
        drain: Callable[[], Awaitable[None]],
        approve: Approve,
    ) -> None:
        self._resolved = resolved
        self._approve = approve
        self._settings = resolved.settings
        self._backends = backends
        self._drain = drain
        self._notify = notify
        self._sandboxes: dict[str, Sandbox] = {}
        self._kernels: dict[str, Kernel] = {}
        self._sweeping: asyncio.Task[None] | None = None
        self._kernel_modules: asyncio.Future[types.ModuleType] | None = None
        self.pool: WarmPool[Sandbox] = WarmPool(self._make_pooled, self._discard, _spare_alive)

    def backends(self) -> list[t.Backend]:
        return [name for name, backend in self._backends.items() if backend.available()]

    def _backend(self, name: t.Backend | None) -> Backend:
        return self._backends[name or self._settings.default_backend]

    # -- sandboxes --------------------------------------------------------------------------

    def sweep_orphans(self) -> None:
        """Removes, in the background, what daemons that were killed left behind: their sandbox
        folders and, through their backends, the rest (only then is a backend's SDK loaded)."""

        async def sweep() -> None:
            places: dict[str, str] = {backend.name: backend.place for backend in self._backends.values()}
            removed = await asyncio.to_thread(
                inventory.remove_orphan_folders,
                self._resolved.sandboxes_path,
                self._resolved.runtime_path,
                places,
            )
            for backend in self._backends.values():
                if backend.name in removed.values():
                    await backend.remove_orphans()

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.warning("cannot remove what killed daemons left: %s", task.exception())

        self._sweeping = asyncio.create_task(sweep(), name="sweep")
        self._sweeping.add_done_callback(done)

    def configure_pool(self, specs: list[t.PoolSpec]) -> None:
        self.pool.configure({self._backend(spec.backend).pool_key(spec.image): spec.size for spec in specs})

    async def create(self, params: t.CreateSandboxParams, on_line: OnLine) -> Sandbox:
        backend = self._backend(params.backend)
        backend.validate(params)
        sandbox = self.pool.take(backend.pool_key(params.image)) if _poolable(params) else None
        if sandbox is not None:
            sandbox.info.created_at = _now()
            on_line("taken from the warm pool")
        else:
            sandbox = await self._make(backend, params, on_line)
        sandbox.info.name = params.name
        self._sandboxes[sandbox.sandbox_id] = sandbox
        log.info("%s sandbox %s created", backend.name, sandbox.sandbox_id)
        return sandbox

    async def _make(self, backend: Backend, params: t.CreateSandboxParams, on_line: OnLine) -> Sandbox:
        """A new sandbox with its agent started."""
        if self._sweeping is not None:  # so that a killed daemon's sandboxes never outlive ours
            await asyncio.wait([self._sweeping])
        if self._kernel_modules is None:  # the first kernel's jupyter_client loads meanwhile
            self._kernel_modules = asyncio.ensure_future(
                asyncio.to_thread(importlib.import_module, "jupyter_client.session")
            )
        sandbox_id = "sb-" + secrets.token_hex(6)
        root = self._resolved.sandboxes_path / sandbox_id
        root.mkdir(parents=True)
        inventory.claim(root, backend.name, backend.place)
        try:
            runtime = await backend.create(sandbox_id, root, params, on_line)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        try:
            await runtime.channel()
        except BaseException as exc:
            await asyncio.shield(runtime.close())
            shutil.rmtree(root, ignore_errors=True)
            if isinstance(exc, ChannelClosed):
                raise errors.BackendUnavailable(
                    f"the sandbox's agent did not start: {exc}", {"backend": backend.name}
                ) from None
            raise
        info = t.SandboxInfo(sandbox_id, backend.name, kernels=[], created_at=_now(), image=runtime.image)
        return Sandbox(info, runtime, root, self._approve)

    async def _make_pooled(self, key: Key) -> Sandbox:
        """A sandbox for the warm pool, with its spare kernel started; its kernel says nothing."""
        name, image = key
        backend = self._backends[name]
        params = t.CreateSandboxParams(backend=backend.name, image=image)
        sandbox = await self._make(backend, params, log.debug)

        def watch(method: str, params: object) -> None:
            """Nobody hears a pooled kernel; its death makes the pool replace it."""
            if isinstance(params, t.KernelStatusNotification) and params.state == "dead":
                self.pool.evict(key, sandbox)

        try:
            sandbox.spare = await self._start(sandbox, name=None, notify=watch, register=False)
        except BaseException:
            await self._discard(sandbox)
            raise
        return sandbox

    async def _discard(self, sandbox: Sandbox, now: bool = True) -> None:
        """Stops a sandbox's kernels, its spare too, and removes the sandbox."""
        kernels = [*sandbox.kernels.values(), *([sandbox.spare] if sandbox.spare else [])]
        sandbox.spare = None
        await asyncio.gather(*(self._drop_kernel(k, now) for k in kernels), sandbox.tools.close())
        await sandbox.runtime.close()
        await asyncio.to_thread(shutil.rmtree, sandbox.root, ignore_errors=True)

    def get(self, sandbox_id: str) -> Sandbox:
        try:
            return self._sandboxes[sandbox_id]
        except KeyError:
            raise errors.SandboxNotFound(f"no sandbox {sandbox_id!r}", {"sandboxId": sandbox_id}) from None

    def list(self) -> list[t.SandboxInfo]:
        return [sandbox.describe() for sandbox in self._sandboxes.values()]

    async def destroy(self, sandbox_id: str, now: bool = False) -> None:
        sandbox = self.get(sandbox_id)
        del self._sandboxes[sandbox_id]
        # out of the list, nothing else would remove it: a cancelled request does not stop that
        await asyncio.shield(self._discard(sandbox, now))
        log.info("sandbox %s destroyed", sandbox_id)

    async def close_all(self) -> None:
        """Stops every kernel and removes every sandbox, the pool's too, at once (the daemon is
        leaving)."""
        await asyncio.gather(
            self.pool.close(),
            *(self.destroy(sandbox_id, now=True) for sandbox_id in list(self._sandboxes)),
            return_exceptions=True,
        )

    # -- kernels ----------------------------------------------------------------------------

    async def start_kernel(self, params: t.StartKernelParams) -> Kernel:
        sandbox = self.get(params.sandbox_id)
        spare, sandbox.spare = sandbox.spare, None
        if spare is not None and _alive(spare):
            spare.adopt(self._notify, params.name)
            self._register(sandbox, spare)
            return spare
        if spare is not None:
            await self._drop_kernel(spare, now=True)
        return await self._start(sandbox, params.name, self._notify, register=True)

    def _register(self, sandbox: Sandbox, kernel: Kernel) -> None:
        """Makes a kernel the client's: listed in its sandbox, found by its id."""
        sandbox.kernels[kernel.kernel_id] = kernel
        self._kernels[kernel.kernel_id] = kernel

    async def _start(self, sandbox: Sandbox, name: str | None, notify: Notify, register: bool) -> Kernel:
        """A started kernel; registered before it starts (so that destroying its sandbox stops
        it), unless it is a pooled one, which is nobody's yet."""
        settings = self._settings
        kernel_id = "k-" + secrets.token_hex(6)
        kernel = Kernel(
            kernel_id=kernel_id,
            sandbox_id=sandbox.sandbox_id,
            runtime=sandbox.runtime,
            text_cap=settings.text_cap,
            interrupt_grace=settings.interrupt_grace,
            start_timeout=settings.kernel_start_timeout,
            notify=notify,
            drain=self._drain,
            tools=self._call_tool,
            name=name,
        )
        if register:
            self._register(sandbox, kernel)
        try:
            await kernel.start()
        except BaseException:
            await self._drop_kernel(kernel, now=True)
            raise
        return kernel

    async def _call_tool(self, kernel: Kernel, execution: Execution | None, request: bytes) -> bytes:
        sandbox = self._sandboxes.get(kernel.sandbox_id)
        if sandbox is None:
            return answer("failed", "the kernel's sandbox is gone")
        return await sandbox.tools.call(kernel.kernel_id, execution, request)

    def kernel(self, kernel_id: str) -> Kernel:
        try:
            return self._kernels[kernel_id]
        except KeyError:
            raise errors.KernelNotFound(f"no kernel {kernel_id!r}", {"kernelId": kernel_id}) from None

    async def shutdown_kernel(self, kernel_id: str) -> None:
        await self._drop_kernel(self.kernel(kernel_id), now=False)

    async def _drop_kernel(self, kernel: Kernel, now: bool) -> None:
        self._kernels.pop(kernel.kernel_id, None)
        sandbox = self._sandboxes.get(kernel.sandbox_id)
        with contextlib.suppress(Exception):
            await kernel.shutdown(now=now)
        if sandbox is not None:
            sandbox.kernels.pop(kernel.kernel_id, None)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _alive(kernel: Kernel) -> bool:
    return not kernel.closed and kernel.state not in ("dead", "restarting")


def _spare_alive(sandbox: Sandbox) -> bool:
    return sandbox.spare is not None and _alive(sandbox.spare)


def _poolable(params: t.CreateSandboxParams) -> bool:
    """Whether a pooled sandbox is what the request asks for: nothing it sets is made at creation."""
    return not (params.env or params.mounts or params.limits or params.runtime) and params.network in (
        None,
        "bridge",
    )
