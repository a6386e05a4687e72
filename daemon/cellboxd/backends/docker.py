"""The `docker` backend: one container per sandbox, kernels started in it with `docker exec`.

The container runs `sleep infinity` under docker-init, hardened (non-root, all capabilities
dropped, no-new-privileges) and limited as asked. Its workspace is a host folder mounted at
`/workspace`, so the daemon saves images and the user drops skills there as on the local
backend. Each kernel gets a slot of five container ports; the daemon reaches them through
ports that the engine publishes on its host's loopback only, and signs its messages with the
kernel's own key. Kernels are launched through a jupyter_client provisioner that talks to the
engine, so a kernel whose process or container goes away is noticed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
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
from cellboxd.backends.forward import PortForward

log = logging.getLogger(__name__)

PYTHON = "/opt/cellbox/venv/bin/python"
WORKSPACE = "/workspace"
CONNECTIONS = "/run/cellbox"
KERNEL_SLOTS = 8  # kernels a docker sandbox can run at once
_PORT_BASE = 20000  # below Linux's ephemeral range, where the kernels' own sockets would race
_CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

LABEL_SANDBOX = "cellbox.sandbox"
LABEL_DAEMON = "cellbox.daemon"
LABEL_DAEMON_PID = "cellbox.daemon.pid"
LABEL_HOST = "cellbox.daemon.host"


def connect() -> docker.DockerClient:
    """A client of the engine that DOCKER_HOST (or the default socket) names, or BackendUnavailable."""
    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        raise errors.BackendUnavailable(
            f"no Docker engine reachable at {where}: {exc}. Start Docker, or point DOCKER_HOST at a "
            "running engine, or use backend 'local'",
            {"backend": "docker"},
        ) from None
    return client


class DockerSandbox:
    def __init__(self, client: docker.DockerClient, root: Path, container: Any, image: str) -> None:
        self.root = root
        self.image = image
        self._client = client
        self._container = container
        self._slots: dict[str, int] = {}
        self._logs: list[BinaryIO] = []
        self._ports: dict[int, int] = _published_ports(container)
        self._forward = (
            PortForward(client, container.id, PYTHON)
            if container.attrs["HostConfig"]["NetworkMode"] == "none"
            else None
        )

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
    ) -> DockerSandbox:
        workspace = root / "workspace"
        for sub in ("skills", "images"):
            (workspace / sub).mkdir(parents=True, exist_ok=True)
        (root / "kernels").mkdir(exist_ok=True)
        _share_workspace(client, image, workspace)
        mounts = [
            docker.types.Mount(WORKSPACE, str(workspace), type="bind"),
            docker.types.Mount(CONNECTIONS, str(root / "kernels"), type="bind", read_only=True),
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
            # no network, so no ports: kernels are reached through `docker exec` (see forward.py)
            kwargs["network_mode"] = "none"
        else:
            slots = range(_PORT_BASE, _PORT_BASE + 5 * KERNEL_SLOTS)
            kwargs["ports"] = {f"{p}/tcp": ("127.0.0.1", None) for p in slots}
        try:
            container = client.containers.run(
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
            container.reload()
        except docker.errors.ImageNotFound:
            raise errors.ImageNotFound(f"image {image!r} not found", {"image": image}) from None
        except docker.errors.APIError as exc:
            raise errors.BackendUnavailable(
                f"the engine refused the sandbox container: {exc.explanation or exc}", {"backend": "docker"}
            ) from None
        return cls(client, root, container, image)

    def kernel_launch(self, kernel_id: str) -> KernelLaunch:
        free = sorted(set(range(KERNEL_SLOTS)) - set(self._slots.values()))
        if not free:
            raise errors.InvalidParams(
                f"Invalid params: a docker sandbox runs at most {KERNEL_SLOTS} kernels; shut one down first"
            )
        slot = self._slots[kernel_id] = free[0]
        container_ports = [_PORT_BASE + 5 * slot + i for i in range(5)]
        host_ports = [self._ports[p] for p in container_ports] if self._forward is None else []
        km = kernel_manager(
            PYTHON,
            f"{CONNECTIONS}/{kernel_id}.json",
            # over the control channel: a signal would need a `docker exec` round trip first
            interrupt_mode="message",
            ip="127.0.0.1",
            connection_file=str(self.root / "kernels" / f"{kernel_id}.host.json"),
        )
        log_path = self.root / "kernels" / f"{kernel_id}.log"
        log_file = log_path.open("ab")
        self._logs.append(log_file)
        km.provisioner = ContainerProvisioner(
            kernel_id=kernel_id,
            kernel_spec=km._kernel_spec,
            parent=km,
        )
        km.provisioner.setup(
            self._client,
            self._container,
            self.root / "kernels",
            container_ports,
            host_ports,
            log_file,
            self._forward,
        )
        return KernelLaunch(km, {}, log_path)

    def release_kernel(self, kernel_id: str) -> None:
        self._slots.pop(kernel_id, None)

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> RunResult:
        loop = asyncio.get_running_loop()

        def emit(line: str) -> None:
            if on_line is not None:
                loop.call_soon_threadsafe(on_line, line)

        return await asyncio.to_thread(self._run, argv, emit if on_line is not None else None)

    def _run(self, argv: list[str], emit: OnLine | None) -> RunResult:
        api = self._client.api
        exec_id = api.exec_create(self.container_id, argv, workdir=WORKSPACE)["Id"]
        out: list[bytes] = []
        err: list[bytes] = []
        pending = b""
        for stdout, stderr in api.exec_start(exec_id, stream=True, demux=True):
            for chunk, sink in ((stdout, out), (stderr, err)):
                if not chunk:
                    continue
                sink.append(chunk)
                if emit is not None:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        emit(line.decode(errors="replace"))
        if emit is not None and pending:
            emit(pending.decode(errors="replace"))
        code = api.exec_inspect(exec_id).get("ExitCode")
        return RunResult(
            -1 if code is None else int(code),
            b"".join(out).decode(errors="replace"),
            b"".join(err).decode(errors="replace"),
        )

    async def close(self) -> None:
        if self._forward is not None:
            await self._forward.close()
        await asyncio.to_thread(self._remove)
        for log_file in self._logs:
            log_file.close()
        await asyncio.to_thread(_rmtree, self.root)

    def _remove(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._container.remove(force=True)


def _share_workspace(client: docker.DockerClient, image: str, workspace: Path) -> None:
    """Gives the workspace to the image's user, where the daemon runs as root.

    Otherwise the image's user has the daemon's own UID, and the folder is already theirs.
    """
    if os.getuid() != 0:
        return
    try:
        labels = client.images.get(image).labels or {}
        uid, gid = int(labels["cellbox.uid"]), int(labels["cellbox.gid"])
    except (docker.errors.ImageNotFound, KeyError, ValueError):
        return
    for path in (workspace, *workspace.rglob("*")):
        os.chown(path, uid, gid)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _published_ports(container: Any) -> dict[int, int]:
    ports: dict[int, int] = {}
    for spec, bindings in (container.attrs["NetworkSettings"]["Ports"] or {}).items():
        for binding in bindings or []:
            if binding.get("HostIp") in ("127.0.0.1", ""):
                ports[int(spec.split("/")[0])] = int(binding["HostPort"])
    return ports


class _Run:
    """One launch of a kernel process: its PID in the container, and how it ended."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.started = threading.Event()
        self.ended = threading.Event()
        self.exit_code: int | None = None


class ContainerProvisioner(KernelProvisionerBase):
    """Starts a kernel in a sandbox's container with `docker exec`, and watches it.

    The exec's output stream stays open for the kernel's life: its first line is the
    kernel's PID in the container (for signals), the rest goes to the kernel's log, and its
    end means the kernel is gone.
    """

    def setup(
        self,
        client: docker.DockerClient,
        container: Any,
        connections: Path,
        container_ports: list[int],
        host_ports: list[int],
        log_file: BinaryIO,
        forward: PortForward | None,
    ) -> None:
        self._client = client
        self._forward = forward
        self._container = container
        self._connections = connections
        self._container_ports = container_ports
        self._host_ports = host_ports
        self._log = log_file
        self._run: _Run | None = None

    @property
    def has_process(self) -> bool:
        return self._run is not None and not self._run.ended.is_set()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        assert isinstance(km, AsyncKernelManager)
        if self._forward is not None and not self._host_ports:
            self._host_ports = [await self._forward.listen(port) for port in self._container_ports]
        for name, port in zip(_CHANNELS, self._host_ports, strict=True):
            setattr(km, name, port)
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        inside = dict(self.connection_info)
        inside.update(zip(_CHANNELS, self._container_ports, strict=True))
        # published ports reach the container's interface; forwarded ones its loopback
        inside["ip"] = "127.0.0.1" if self._forward is not None else "0.0.0.0"
        inside["key"] = km.session.key.decode()
        target = self._connections / f"{self.kernel_id}.json"
        target.write_text(json.dumps(inside))
        target.chmod(0o644)
        return await super().pre_launch(cmd=km.format_kernel_cmd(), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        api = self._client.api
        wrapped = ["sh", "-c", 'echo "$$"; exec "$@"', "sh", *cmd]
        exec_id = api.exec_create(self._container.id, wrapped, workdir=WORKSPACE)["Id"]
        stream = api.exec_start(exec_id, stream=True)
        run = self._run = _Run()
        threading.Thread(target=self._watch, args=(run, exec_id, stream), daemon=True).start()
        await asyncio.to_thread(run.started.wait, 30)
        if run.pid is None:
            raise RuntimeError("the kernel did not start in the container")
        return self.connection_info

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
                    run.started.set()
                    chunk = rest
                self._log.write(chunk)
                self._log.flush()
        except Exception as exc:  # the container went away under the stream
            log.debug("kernel %s: exec stream ended: %s", self.kernel_id, exc)
        finally:
            close = getattr(stream, "close", None)  # its socket, at once rather than at collection
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            try:
                code = self._client.api.exec_inspect(exec_id).get("ExitCode")
            except Exception:
                code = None
            run.exit_code = -1 if code is None else int(code)
            run.ended.set()
            run.started.set()

    async def poll(self) -> int | None:
        run = self._run
        return run.exit_code if run is not None and run.ended.is_set() else None

    async def wait(self) -> int | None:
        run = self._run
        if run is None:
            return None
        await asyncio.to_thread(run.ended.wait)
        return run.exit_code

    async def send_signal(self, signum: int) -> None:
        run = self._run
        if run is None or run.pid is None or run.ended.is_set():
            return
        await asyncio.to_thread(self._signal, run.pid, signum)

    def _signal(self, pid: int, signum: int) -> None:
        # the shell's own `kill`: slim images have no kill binary
        with contextlib.suppress(docker.errors.APIError):
            result = self._container.exec_run(["sh", "-c", f"kill -{int(signum)} {int(pid)}"])
            if result.exit_code:
                log.debug("kernel %s: kill -%d failed: %s", self.kernel_id, signum, result.output)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        if not restart:
            with contextlib.suppress(OSError):
                (self._connections / f"{self.kernel_id}.json").unlink()
