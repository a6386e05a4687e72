"""The two sides of every comparison, and the kernels behind them.

cellbox is driven through its Python `AsyncClient`, as users drive it. The baseline is a tight
loop on jupyter_client's `AsyncKernelClient` talking to the same kind of kernel directly: on
`local` an ipykernel that `AsyncKernelManager` starts with this interpreter over IPC sockets
(as cellbox's local kernels), on `docker` ipykernels in a container of cellbox's own image over
IPC sockets in a bind-mounted folder (the fastest way to reach a kernel in a container), and on
`remote` (an engine on another machine) the same container with its kernels' ports published
over TCP (the only way jupyter_client reaches a kernel there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import docker
import docker.types
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from cellbox import AsyncClient, AsyncKernel, CellboxError, PoolSpec
from cellbox import types as t
from cellboxd.backends.docker.images import LABEL_GID, LABEL_UID
from cellboxd.backends.docker.images import PYTHON as IMAGE_PYTHON

T = TypeVar("T")

DAEMON = [sys.executable, "-m", "cellboxd", "serve", "--log-level", "warning"]
BENCH_LABEL = "cellbox-bench.pid"  # on the baseline's containers: the benchmark's PID
_CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
_CONN = "/conn"  # the docker baseline's folder of connection files and sockets, in its container
_READY_TIMEOUT = 60.0
_FIRST_PORT = 40000  # of the remote baseline's published ports, five a kernel


class CellboxFailed(Exception):
    """cellbox did not do what a case asked (an error, a bad status, no answer in time).

    A finding of the benchmark, not an error of it.
    """


class Driver(Protocol):
    """Runs cells on one kernel, from the request to the end of the execution."""

    async def execute(self, code: str) -> None: ...

    async def stream(self, code: str) -> int:
        """Runs `code`; the bytes of stream output that reached the client."""
        ...


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """Like `asyncio.gather`, but waits for every awaitable before raising the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def cellbox_call(what: str, seconds: float) -> AsyncIterator[None]:
    """Turns an error answer or no answer within `seconds` into CellboxFailed."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise CellboxFailed(f"{what}: no answer within {seconds:g} s") from None
    except CellboxError as exc:
        raise CellboxFailed(f"{what}: {type(exc).__name__}: {exc}") from exc


@contextlib.asynccontextmanager
async def daemon(
    home: Path, pool: list[PoolSpec] | None = None, extra: dict[str, str] | None = None
) -> AsyncIterator[AsyncClient]:
    """A started client whose daemon keeps its state under `home` and sends its logs nowhere;
    `pool` is its warm pool, `extra` more of its environment (its engine, its settings)."""
    env = {f"CELLBOX_{name.upper()}_DIR": str(home / name) for name in ("data", "log", "cache")}
    env.update(extra or {})
    env["CELLBOX_RUNTIME_DIR"] = str(home / "run")
    env["CELLBOX_CONFIG"] = str(home / "config.toml")  # absent: the user's config plays no part
    client = AsyncClient(DAEMON, env=env, stderr=subprocess.DEVNULL, pool=pool)
    async with cellbox_call("starting the daemon", 30):
        await client.start()
    try:
        yield client
    finally:
        await client.close()


class CellboxDriver:
    def __init__(self, kernel: AsyncKernel, timeout: float = 120.0) -> None:
        self.kernel = kernel
        self._timeout = timeout

    async def execute(self, code: str) -> None:
        async with cellbox_call("execute", self._timeout):
            result = await self.kernel.execute(code)
        _check(result)

    async def stream(self, code: str) -> int:
        received = 0
        async with cellbox_call("execute", self._timeout):
            execution = self.kernel.stream(code)
            async for event in execution:
                if isinstance(event, t.OutputNotification):
                    received += len(event.text.encode())
            result = await execution.result()
        _check(result)
        return received


def _check(result: t.ExecuteResult) -> None:
    if result.status != "ok":
        raise CellboxFailed(f"execute ended with status {result.status!r}: {result.error}")


class BaselineDriver:
    """The baseline loop: execute_request, IOPub until idle for it, then the shell reply."""

    def __init__(self, client: AsyncKernelClient) -> None:
        self.client = client

    async def execute(self, code: str) -> None:
        await self.stream(code)

    async def stream(self, code: str) -> int:
        kc = self.client
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        received = 0
        while True:
            msg = await kc.get_iopub_msg()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                received += len(msg["content"]["text"].encode())
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while (reply := await kc.get_shell_msg())["parent_header"].get("msg_id") != msg_id:
            pass
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the baseline kernel answered {reply['content']}")
        return received


def _local_spec(home: Path) -> Path:
    """A fresh folder holding the kernelspec `bench`: ipykernel run by this interpreter."""
    folder = Path(tempfile.mkdtemp(prefix="lk-", dir=home))
    spec = folder / "kernels" / "bench"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "bench", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    return folder


@contextlib.asynccontextmanager
async def local_kernels(home: Path, n: int) -> AsyncIterator[list[AsyncKernelClient]]:
    """`n` ipykernels of this interpreter, started by AsyncKernelManager, over IPC sockets."""
    folder = _local_spec(home)
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    managers = [
        AsyncKernelManager(
            kernel_name="bench",
            kernel_spec_manager=specs,
            transport="ipc",
            ip=str(folder / f"k{i}"),
            connection_file=str(folder / f"k{i}.json"),
        )
        for i in range(n)
    ]
    clients: list[AsyncKernelClient] = []
    try:
        await gather_all(*(km.start_kernel() for km in managers))
        clients = [km.client() for km in managers]
        await _ready(clients)
        yield clients
    finally:
        for kc in clients:
            kc.stop_channels()
        await asyncio.gather(
            *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel), return_exceptions=True
        )


def _connection_files(engine: docker.DockerClient, home: Path, image: str, n: int, key: str) -> Path:
    """A fresh folder with the connection files of `n` kernels in a container of `image`; their
    IPC sockets are made there too, so it is the image's user's (as a docker sandbox's sockets)."""
    folder = Path(tempfile.mkdtemp(prefix="dk-", dir=home))
    for i in range(n):
        info: dict[str, Any] = dict(zip(_CHANNELS, range(1, 6), strict=True))
        info.update(ip=f"{_CONN}/k{i}", transport="ipc", key=key, signature_scheme="hmac-sha256")
        (folder / f"k{i}.json").write_text(json.dumps(info))
    if os.getuid() == 0:  # else the image's user has our UID (cellbox builds it so)
        labels = engine.images.get(image).labels or {}
        uid, gid = int(labels[LABEL_UID]), int(labels[LABEL_GID])
        for path in (folder, *folder.iterdir()):
            os.chown(path, uid, gid)
    return folder


# Run in the remote baseline's container: writes each kernel's connection file (TCP on every
# interface, its five ports from argv[2 + i]) and starts the kernels.
_REMOTE_LAUNCH = f"""
import json, subprocess, sys
key, ports, kernels = sys.argv[1], [int(p) for p in sys.argv[2:]], []
for i in range(len(ports) // 5):
    info = dict(zip({_CHANNELS!r}, ports[5 * i : 5 * i + 5]), ip="0.0.0.0", transport="tcp", key=key)
    info["signature_scheme"] = "hmac-sha256"
    path = f"/tmp/k{{i}}.json"
    with open(path, "w") as file:
        json.dump(info, file)
    kernels.append(subprocess.Popen([sys.executable, "-m", "ipykernel_launcher", "-f", path]))
for kernel in kernels:
    kernel.wait()
"""


@contextlib.asynccontextmanager
async def docker_kernels(
    engine: docker.DockerClient, home: Path, image: str, n: int, remote_host: str | None = None
) -> AsyncIterator[list[AsyncKernelClient]]:
    """`n` ipykernels in one container of `image` (`docker run`): over IPC sockets in a bind
    mount, or, on an engine of another machine (`remote_host`), over its published TCP ports."""
    key = secrets.token_hex(16)
    infos: list[Any] = []
    if remote_host is None:
        folder = await asyncio.to_thread(_connection_files, engine, home, image, n, key)
        launch = [
            "sh",
            "-c",
            f'for f in {_CONN}/*.json; do {IMAGE_PYTHON} -m ipykernel_launcher -f "$f" & done; wait',
        ]
        options: dict[str, Any] = {"mounts": [docker.types.Mount(_CONN, str(folder), type="bind")]}
        for i in range(n):
            infos.append(
                {
                    **dict(zip(_CHANNELS, range(1, 6), strict=True)),
                    "ip": str(folder / f"k{i}"),
                    "transport": "ipc",
                }
            )
    else:
        ports = list(range(_FIRST_PORT, _FIRST_PORT + 5 * n))
        launch = [IMAGE_PYTHON, "-c", _REMOTE_LAUNCH, key, *map(str, ports)]
        options = {"ports": {f"{port}/tcp": port for port in ports}}
        for i in range(n):
            infos.append(
                {
                    **dict(zip(_CHANNELS, ports[5 * i : 5 * i + 5], strict=True)),
                    "ip": remote_host,
                    "transport": "tcp",
                }
            )
    container = await asyncio.to_thread(
        engine.containers.run,
        image,
        launch,
        detach=True,
        init=True,
        labels={BENCH_LABEL: str(os.getpid())},
        **options,
    )
    clients: list[AsyncKernelClient] = []
    try:
        for info in infos:
            info.update(key=key.encode(), signature_scheme="hmac-sha256")
            kc = AsyncKernelClient()
            kc.load_connection_info(info)
            clients.append(kc)
        await _ready(clients)
        yield clients
    finally:
        for kc in clients:
            kc.stop_channels()
        await asyncio.to_thread(container.remove, force=True)


async def _ready(clients: list[AsyncKernelClient]) -> None:
    """Starts the clients' channels and waits for their kernels to answer.

    The heartbeat starts after: a client without a manager takes a kernel whose heartbeat is
    silent for a second (a busy start) for dead, and gives up waiting.
    """
    for kc in clients:
        kc.start_channels(hb=False)
    await gather_all(*(kc.wait_for_ready(timeout=_READY_TIMEOUT) for kc in clients))
    for kc in clients:
        kc.hb_channel.start()


def remove_stale_containers(engine: docker.DockerClient) -> None:
    """Removes baseline containers that a killed benchmark left behind."""
    for container in engine.containers.list(all=True, filters={"label": BENCH_LABEL}):
        pid = container.labels.get(BENCH_LABEL, "")
        if pid != str(os.getpid()) and not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            container.remove(force=True)
