"""The daemon's sandboxes and their kernels: creation, lookup and teardown."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from cellbox import errors
from cellbox import types as t
from cellboxd import inventory
from cellboxd.backends.base import OnLine, SandboxRuntime
from cellboxd.backends.docker import DockerSandbox
from cellboxd.backends.local import LocalSandbox
from cellboxd.config import Settings
from cellboxd.engine import DockerEngine
from cellboxd.execution import Notify
from cellboxd.kernels import Kernel

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(self, info: t.SandboxInfo, runtime: SandboxRuntime) -> None:
        self.info = info
        self.runtime = runtime
        self.kernels: dict[str, Kernel] = {}
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
        settings: Callable[[], Settings],
        notify: Notify,
        drain: Callable[[], Awaitable[None]],
        docker: DockerEngine,
    ) -> None:
        self._settings = settings
        self._drain = drain
        self.docker = docker
        self._notify = notify
        self._sandboxes: dict[str, Sandbox] = {}
        self._kernels: dict[str, Kernel] = {}
        self._swept = False

    @property
    def _root(self) -> Path:
        return self._settings().sandboxes_path

    def backends(self) -> list[t.Backend]:
        return ["local", "docker"] if self.docker.reachable() else ["local"]

    # -- sandboxes --------------------------------------------------------------------------

    async def create(self, params: t.CreateSandboxParams, on_line: OnLine) -> Sandbox:
        backend = params.backend or self._settings().default_backend
        if backend == "local" and (params.image or params.mounts or params.limits or params.network):
            raise errors.InvalidParams(
                "Invalid params: `image`, `mounts`, `limits` and `network` need the docker backend; "
                "the local backend isolates nothing"
            )
        if not self._swept:
            self._swept = True
            await asyncio.to_thread(inventory.remove_orphan_folders, self._root)
        sandbox_id = "sb-" + secrets.token_hex(6)
        root = self._root / sandbox_id
        root.mkdir(parents=True)
        inventory.claim(root, backend)
        runtime: SandboxRuntime
        image: str | None = None
        try:
            if backend == "docker":
                client = await self.docker.client()
                image = await self.docker.resolve_image(params.image, on_line)
                runtime = await asyncio.to_thread(
                    functools.partial(
                        DockerSandbox.create,
                        client,
                        root=root,
                        sandbox_id=sandbox_id,
                        daemon_id=self.docker.daemon_id,
                        image=image,
                        params=params,
                    )
                )
            else:
                sockets = self._settings().runtime_path
                runtime = await asyncio.to_thread(LocalSandbox.create, root, params.env, sockets)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        info = t.SandboxInfo(
            sandbox_id=sandbox_id,
            backend=backend,
            kernels=[],
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            image=image,
            name=params.name,
        )
        sandbox = Sandbox(info, runtime)
        self._sandboxes[sandbox_id] = sandbox
        log.info("%s sandbox %s created in %s", backend, sandbox_id, root)
        return sandbox

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
        await asyncio.gather(*(self._drop_kernel(k, now) for k in list(sandbox.kernels.values())))
        await sandbox.runtime.close()
        log.info("sandbox %s destroyed", sandbox_id)

    async def close_all(self) -> None:
        """Stops every kernel and removes every sandbox, at once (the daemon is leaving)."""
        await asyncio.gather(
            *(self.destroy(sandbox_id, now=True) for sandbox_id in list(self._sandboxes)),
            return_exceptions=True,
        )

    # -- kernels ----------------------------------------------------------------------------

    async def start_kernel(self, params: t.StartKernelParams) -> Kernel:
        sandbox = self.get(params.sandbox_id)
        settings = self._settings()
        kernel_id = "k-" + secrets.token_hex(6)
        kernel = Kernel(
            kernel_id=kernel_id,
            sandbox_id=sandbox.sandbox_id,
            launch=sandbox.runtime.kernel_launch(kernel_id),
            images_dir=sandbox.runtime.workspace / "images",
            text_cap=settings.text_cap,
            interrupt_grace=settings.interrupt_grace,
            start_timeout=settings.kernel_start_timeout,
            notify=self._notify,
            drain=self._drain,
            name=params.name,
        )
        sandbox.kernels[kernel_id] = kernel
        self._kernels[kernel_id] = kernel
        try:
            await kernel.start()
        except BaseException:
            await self._drop_kernel(kernel, now=True)
            raise
        return kernel

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
            sandbox.runtime.release_kernel(kernel.kernel_id)
