"""The `docker` backend: one container per sandbox, kernels started in it with `docker exec`.

The container runs `sleep infinity` under docker-init, hardened (non-root, all capabilities
dropped, no-new-privileges) and limited as asked. Its workspace is a host folder mounted at
`/workspace`, so the daemon saves images and the user drops skills there as on the local
backend.

Kernels talk to the daemon over zmq IPC, as local kernels do: each sandbox has a folder of unix
sockets in the daemon's runtime dir (short, as a socket path must stay under 108 bytes),
bind-mounted read-write at `/run/cellbox/sockets`, where its kernels bind their five sockets
and the daemon connects to them; each kernel's credits FIFO (see base.py) is there too. The
container publishes no ports, so it starts and goes away in a fraction of a second, and a
sandbox with `network: "none"` is reached the same way. The daemon signs its messages with
each kernel's own key. Kernels are launched through a jupyter_client provisioner that talks
to the engine, so a kernel whose process or container goes away is noticed at once. A sandbox
runs any number of kernels: each is a process in the container, so the sandbox's limits
(`pids`, memory) are what bound them.

The engine must share the daemon's filesystem: Docker Engine on the daemon's machine. The
workspace and the sockets are bind mounts of the daemon's folders, and a unix socket joins
the processes of one operating system only: an engine in a VM (Docker Desktop) or on another
machine cannot carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import KernelLaunch, OnLine, RunResult, kernel_manager
from cellboxd.inventory import SOCKETS_LINK

log = logging.getLogger(__name__)

PYTHON = "/opt/cellbox/venv/bin/python"
WORKSPACE = "/workspace"
CONNECTIONS = "/run/cellbox/kernels"  # the kernels' connection files, read-only
SOCKETS = "/run/cellbox/sockets"  # the kernels' IPC sockets, shared with the daemon
_START_TIMEOUT = 30.0  # seconds for `docker exec` to report a kernel's PID

LABEL_SANDBOX = "cellbox.sandbox"
LABEL_DAEMON = "cellbox.daemon"
LABEL_DAEMON_PID = "cellbox.daemon.pid"
LABEL_HOST = "cellbox.daemon.host"


def connect() -> docker.DockerClient:
    """A client of the engine that DOCKER_HOST (or the default socket) names, or BackendUnavailable."""
    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env(timeout=30)
        # one connection per request, closed when it is answered: the SDK keeps a pool per URL
        # (25 of them), so kept-alive connections would pile up with every container and exec
        # id; a unix socket costs microseconds to open, an engine call milliseconds
        client.api.headers["Connection"] = "close"
        client.ping()
    except Exception as exc:
        raise errors.BackendUnavailable(
            f"no Docker engine reachable at {where}: {exc}. Start Docker, or point DOCKER_HOST at a "
            "running engine, or use backend 'local'",
            {"backend": "docker"},
        ) from None
    return client


class DockerSandbox:
    def __init__(
        self,
        client: docker.DockerClient,
        root: Path,
        sockets: Path,
        container: Any,
        image: str,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.root = root
        self.image = image
        self._client = client
        self._container = container
        self._sockets = sockets
        self._owner = owner  # the image's user, who is given the kernels' files; None: the daemon's
        self._logs: dict[str, BinaryIO] = {}

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def python(self) -> str:
        return PYTHON

    @property
    def uv(self) -> str | None:
        return None

    @property
    def container_id(self) -> str:
        return str(self._container.id)

    @classmethod
    def create(
        cls,
        client: docker.DockerClient,
        *,
        root: Path,
        sandbox_id: str,
        daemon_id: str,
        image: str,
        params: t.CreateSandboxParams,
        sockets: Path,
    ) -> DockerSandbox:
        """A sandbox's container; `sockets` is a new folder for its kernels' IPC sockets, short
        and private to the daemon's user (`runtime_dir/<sandbox id>`), removed with the sandbox."""
        workspace = root / "workspace"
        for sub in ("skills", "images"):
            (workspace / sub).mkdir(parents=True, exist_ok=True)
        (root / "kernels").mkdir(exist_ok=True)
        sockets.mkdir(mode=0o700)
        try:
            # so that the sweep of orphans finds the folder even when the container is gone
            (root / SOCKETS_LINK).symlink_to(sockets, target_is_directory=True)
            owner = _share(client, image, workspace, sockets)
            container = _run_container(client, root, sockets, sandbox_id, daemon_id, image, params)
        except BaseException:
            _rmtree(sockets)
            raise
        return cls(client, root, sockets, container, image, owner)

    def kernel_launch(self, kernel_id: str) -> KernelLaunch:
        # the kernel's credits FIFO (see base.py) sits with its sockets, where both ends reach it
        credits = self._sockets / f"{kernel_id}.credits"
        os.mkfifo(credits, 0o600)
        if self._owner is not None:
            os.chown(credits, *self._owner)
        km = kernel_manager(
            PYTHON,
            f"{CONNECTIONS}/{kernel_id}.json",
            # over the control channel: a signal would need a `docker exec` round trip first
            interrupt_mode="message",
            credits=f"{SOCKETS}/{kernel_id}.credits",
            transport="ipc",
            ip=str(self._sockets / kernel_id),
            connection_file=str(self.root / "kernels" / f"{kernel_id}.host.json"),
        )
        log_path = self.root / "kernels" / f"{kernel_id}.log"
        log_file = self._logs[kernel_id] = log_path.open("ab")
        provisioner = ContainerProvisioner(kernel_id=kernel_id, kernel_spec=km._kernel_spec, parent=km)
        provisioner.setup(self._client, self._container, self.root / "kernels", log_file)
        km.provisioner = provisioner
        return KernelLaunch(km, {}, log_path, credits)

    def release_kernel(self, kernel_id: str) -> None:
        log_file = self._logs.pop(kernel_id, None)
        if log_file is not None:
            log_file.close()
        with contextlib.suppress(OSError):
            (self._sockets / f"{kernel_id}.credits").unlink()

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> RunResult:
        loop = asyncio.get_running_loop()

        def emit(line: str) -> None:
            if on_line is not None:
                loop.call_soon_threadsafe(on_line, line)

        return await asyncio.to_thread(self._run, argv, emit if on_line is not None else None)

    def _run(self, argv: list[str], emit: OnLine | None) -> RunResult:
        out: list[bytes] = []
        err: list[bytes] = []
        pending = b""

        def take(chunk: bytes, sink: list[bytes]) -> None:
            nonlocal pending
            sink.append(chunk)
            if emit is not None:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    emit(line.decode(errors="replace"))

        code = exec_in(
            self._client.api,
            self.container_id,
            argv,
            on_stdout=lambda chunk: take(chunk, out),
            on_stderr=lambda chunk: take(chunk, err),
        )
        if emit is not None and pending:
            emit(pending.decode(errors="replace"))
        return RunResult(
            -1 if code is None else code,
            b"".join(out).decode(errors="replace"),
            b"".join(err).decode(errors="replace"),
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._remove)
        for log_file in self._logs.values():
            log_file.close()
        self._logs.clear()
        await asyncio.to_thread(_rmtree, self._sockets)
        await asyncio.to_thread(_rmtree, self.root)

    def _remove(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._container.remove(force=True)


def _run_container(
    client: docker.DockerClient,
    root: Path,
    sockets: Path,
    sandbox_id: str,
    daemon_id: str,
    image: str,
    params: t.CreateSandboxParams,
) -> Any:
    mounts = [
        docker.types.Mount(WORKSPACE, str(root / "workspace"), type="bind"),
        docker.types.Mount(CONNECTIONS, str(root / "kernels"), type="bind", read_only=True),
        docker.types.Mount(SOCKETS, str(sockets), type="bind"),
        *(
            docker.types.Mount(m.target, os.path.abspath(m.source), type="bind", read_only=m.read_only)
            for m in params.mounts
        ),
    ]
    limits = params.limits or t.Limits()
    kwargs: dict[str, Any] = {}
    if limits.memory_mb is not None:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = f"{limits.memory_mb}m"
    if limits.cpus is not None:
        kwargs["nano_cpus"] = int(limits.cpus * 1e9)
    if limits.pids is not None:
        kwargs["pids_limit"] = limits.pids
    if params.network == "none":
        kwargs["network_mode"] = "none"  # the kernels' sockets are files: they need no network
    try:
        return client.containers.run(
            image,
            ["sleep", "infinity"],
            name=f"cellbox-{sandbox_id}",
            detach=True,
            init=True,
            environment=params.env,
            working_dir=WORKSPACE,
            mounts=mounts,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            labels={
                LABEL_SANDBOX: sandbox_id,
                LABEL_DAEMON: daemon_id,
                LABEL_DAEMON_PID: str(os.getpid()),
                LABEL_HOST: os.uname().nodename,
            },
            **kwargs,
        )
    except docker.errors.ImageNotFound:
        raise errors.ImageNotFound(f"image {image!r} not found", {"image": image}) from None
    except docker.errors.APIError as exc:
        raise errors.BackendUnavailable(
            f"the engine refused the sandbox container: {exc.explanation or exc}", {"backend": "docker"}
        ) from None


def _share(client: docker.DockerClient, image: str, workspace: Path, sockets: Path) -> tuple[int, int] | None:
    """Gives the workspace and the sockets folder to the image's user, where the daemon runs as
    root; that user's UID and GID, or None where nothing was given.

    Otherwise the image's user has the daemon's own UID, and the folders are already theirs.
    """
    if os.getuid() != 0:
        return None
    try:
        labels = client.images.get(image).labels or {}
        uid, gid = int(labels["cellbox.uid"]), int(labels["cellbox.gid"])
    except (docker.errors.ImageNotFound, KeyError, ValueError):
        return None
    for path in (workspace, *workspace.rglob("*"), sockets):
        os.chown(path, uid, gid)
    return uid, gid


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def exec_in(
    api: Any,
    container_id: str,
    argv: list[str],
    *,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
) -> int | None:
    """Runs `argv` in the container (in the workspace) and waits for it; its exit code.

    The exec's HTTP connection is closed when it ends: the SDK's stream keeps its socket in a
    reference cycle, which only the garbage collector would break.
    """
    exec_id = api.exec_create(container_id, argv, workdir=WORKSPACE)["Id"]
    stream = api.exec_start(exec_id, stream=True, demux=True)
    try:
        for stdout, stderr in stream:
            if stdout and on_stdout is not None:
                on_stdout(stdout)
            if stderr and on_stderr is not None:
                on_stderr(stderr)
    finally:
        close_stream(stream)
    code = api.exec_inspect(exec_id).get("ExitCode")
    return None if code is None else int(code)


def close_stream(stream: Any) -> None:
    """Closes a streamed exec's output and the HTTP response under it, releasing its socket now."""
    with contextlib.suppress(Exception):
        stream.close()  # shuts the socket down, which ends a read blocked in another thread
    response = getattr(stream, "_response", None)
    if response is not None:
        with contextlib.suppress(Exception):
            response.close()


class _Run:
    """One launch of a kernel process: its PID in the container, and how it ended.

    The watcher thread fills it in; the event loop learns of it through futures that the
    thread resolves with `call_soon_threadsafe`, so no thread waits on its behalf.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.ended = threading.Event()
        self._loop = loop
        self.started: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def set_started(self) -> None:
        self._resolve(self.started)

    def set_ended(self, code: int) -> None:
        self.exit_code = code
        self.ended.set()
        self._resolve(self.started)
        self._resolve(self.done)

    def _resolve(self, future: asyncio.Future[None]) -> None:
        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
            self._loop.call_soon_threadsafe(resolve)

    async def wait_ended(self) -> None:
        if self.ended.is_set():
            return
        if self.done.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(self.done)  # a cancelled waiter leaves the future to the others
        else:
            await asyncio.to_thread(self.ended.wait)


class ContainerProvisioner(KernelProvisionerBase):
    """Starts a kernel in a sandbox's container with `docker exec`, and watches it.

    The exec's output stream stays open for the kernel's life: its first line is the
    kernel's PID in the container (for signals), the rest goes to the kernel's log, and its
    end means the kernel is gone.
    """

    def setup(
        self, client: docker.DockerClient, container: Any, connections: Path, log_file: BinaryIO
    ) -> None:
        self._client = client
        self._container = container
        self._connections = connections
        self._log = log_file
        self._run: _Run | None = None

    @property
    def has_process(self) -> bool:
        return self._run is not None and not self._run.ended.is_set()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        assert isinstance(km, AsyncKernelManager)
        km.write_connection_file()  # the daemon's side: the host's socket paths
        self.connection_info = km.get_connection_info()
        inside = dict(self.connection_info)
        inside["ip"] = f"{SOCKETS}/{self.kernel_id}"  # the same sockets, as the container sees them
        inside["key"] = km.session.key.decode()
        target = self._connections / f"{self.kernel_id}.json"
        target.write_text(json.dumps(inside))
        target.chmod(0o644)
        return await super().pre_launch(cmd=km.format_kernel_cmd(), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        run = self._run = _Run(asyncio.get_running_loop())
        wrapped = ["sh", "-c", 'echo "$$"; exec "$@"', "sh", *cmd]
        try:
            exec_id, stream = await asyncio.to_thread(self._start, wrapped)
        except docker.errors.APIError as exc:  # e.g. the container is no longer running
            run.set_ended(-1)
            raise self._not_started(exc.explanation or str(exc)) from None
        threading.Thread(
            target=self._watch, args=(run, exec_id, stream), name=f"kernel-{self.kernel_id}", daemon=True
        ).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.started), _START_TIMEOUT)
        if run.pid is None:
            close_stream(stream)
            why = "`docker exec` ended first" if run.ended.is_set() else f"no PID within {_START_TIMEOUT:g} s"
            raise self._not_started(why)
        return self.connection_info

    def _not_started(self, why: str) -> errors.KernelDied:
        return errors.KernelDied(
            f"kernel {self.kernel_id} could not start in the sandbox's container: {why}",
            {"kernelId": self.kernel_id},
        )

    def _start(self, argv: list[str]) -> tuple[str, Any]:
        api = self._client.api
        exec_id = api.exec_create(self._container.id, argv, workdir=WORKSPACE)["Id"]
        return exec_id, api.exec_start(exec_id, stream=True)

    def _watch(self, run: _Run, exec_id: str, stream: Iterator[bytes]) -> None:
        pending = b""
        try:
            for chunk in stream:
                if run.pid is None:
                    pending += chunk
                    first, sep, rest = pending.partition(b"\n")
                    if not sep:
                        continue
                    with contextlib.suppress(ValueError):
                        run.pid = int(first)
                    run.set_started()
                    chunk = rest
                self._write_log(chunk)
        except Exception as exc:  # the container went away under the stream
            log.debug("kernel %s: exec stream ended: %s", self.kernel_id, exc)
        finally:
            close_stream(stream)
            try:
                code = self._client.api.exec_inspect(exec_id).get("ExitCode")
            except Exception:
                code = None
            run.set_ended(-1 if code is None else int(code))

    def _write_log(self, data: bytes) -> None:
        try:
            self._log.write(data)
            self._log.flush()
        except (OSError, ValueError):  # the log was closed: the kernel was let go
            pass

    async def poll(self) -> int | None:
        run = self._run
        return run.exit_code if run is not None and run.ended.is_set() else None

    async def wait(self) -> int | None:
        run = self._run
        if run is None:
            return None
        await run.wait_ended()
        return run.exit_code

    async def send_signal(self, signum: int) -> None:
        run = self._run
        if run is None or run.pid is None or run.ended.is_set():
            return
        await asyncio.to_thread(self._signal, run.pid, signum)

    def _signal(self, pid: int, signum: int) -> None:
        # the shell's own `kill`: slim images have no kill binary
        failure: list[bytes] = []
        with contextlib.suppress(docker.errors.APIError):
            argv = ["sh", "-c", f"kill -{int(signum)} {int(pid)}"]
            code = exec_in(self._client.api, self._container.id, argv, on_stderr=failure.append)
            if code:
                log.debug("kernel %s: kill -%d failed: %r", self.kernel_id, signum, b"".join(failure))

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        if not restart:
            with contextlib.suppress(OSError):
                (self._connections / f"{self.kernel_id}.json").unlink()
