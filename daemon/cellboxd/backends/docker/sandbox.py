"""A docker sandbox: one hardened container, reached only through the engine's API.

The container runs `sleep infinity` under docker-init as the image's user (non-root in the
images cellbox builds), with every capability dropped, no-new-privileges, memory, CPU and
process limits (the sandbox's, else the configured defaults), and a read-only root file system.
What it may write: `/tmp` (a tmpfs), the workspace, the packages installed at runtime and the
image user's home (an engine volume each, removed with the container), and the user's `mounts`
(folders of the engine's machine). Nothing of the daemon's machine is mounted, but for the
read-only folder of the channel's socket on an engine of this machine (channel_socket.py).

The agent (sandbox/agent.py) runs in it as one exec session of the engine's API, its stdin and
stdout the sandbox's channel (engine.exec_link), or, where the daemon offers one, that socket:
kernels, commands, files and images all go through it, so the same sandbox works on a local
engine, a remote one, Docker Desktop, Podman or gVisor alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cellbox import errors
from cellbox import types as t
from cellboxd import channel as ch
from cellboxd.backends.base import SandboxRuntime
from cellboxd.backends.docker import channel_socket, engine
from cellboxd.backends.docker.channel_socket import ChannelSocket
from cellboxd.backends.docker.images import HOME, PACKAGES, PYTHON, WORKSPACE
from cellboxd.config import DefaultLimits

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

LABEL_SANDBOX = "cellbox.sandbox"
LABEL_DAEMON = "cellbox.daemon"
LABEL_DAEMON_PID = "cellbox.daemon.pid"
LABEL_HOST = "cellbox.daemon.host"

_STOP_CHECKS, _STOP_CHECK_EVERY = 5, 0.2  # how long an ended exec session waits to learn why
# what the engine's info says it can enforce, by the field of `limits`
_ENFORCED = {"memory_mb": "MemoryLimit", "cpus": "CpuCfsQuota", "pids": "PidsLimit"}
_FIELDS = {"memory_mb": "memoryMb", "cpus": "cpus", "pids": "pids"}


class Hardening:
    """How the daemon's settings harden a container (see config.py)."""

    def __init__(self, limits: DefaultLimits, read_only_root: bool, tmp_size_mb: int, runtime: str) -> None:
        self.limits = limits
        self.read_only_root = read_only_root
        self.tmp_size_mb = tmp_size_mb
        self.runtime = runtime


def limits_of(params: t.CreateSandboxParams, defaults: DefaultLimits) -> dict[str, float]:
    """The limits a sandbox gets, by field: its own, else the defaults; 0 (no limit) left out."""
    asked = params.limits or t.Limits()
    chosen = {
        "memory_mb": asked.memory_mb if asked.memory_mb is not None else defaults.memory_mb,
        "cpus": asked.cpus if asked.cpus is not None else defaults.cpus,
        "pids": asked.pids if asked.pids is not None else defaults.pids,
    }
    return {field: value for field, value in chosen.items() if value}


def engine_facts(client: docker.DockerClient) -> dict[str, Any]:
    """The engine's `info`, corrected where it claims to enforce limits it cannot: a rootless
    engine on cgroup v1 (rootless Docker says so in its security options, rootless Podman in
    its own API only) drops them with no more than a warning that clients never see. Blocks."""
    info: dict[str, Any] = client.info()
    rootless = any("name=rootless" in option for option in info.get("SecurityOptions") or [])
    components = [c.get("Name", "") for c in client.version().get("Components") or []]
    if not rootless and "Podman Engine" in components:
        libpod = client.api._result(client.api._get(client.api.base_url + "/v4.0.0/libpod/info"), json=True)
        rootless = bool(libpod.get("host", {}).get("security", {}).get("rootless"))
    if rootless and str(info.get("CgroupVersion")) == "1":
        info.update({key: False for key in _ENFORCED.values()})
        info["LimitsWhy"] = "a rootless engine on cgroup v1 ignores resource limits"
    return info


def check_enforced(limits: dict[str, float], params: t.CreateSandboxParams, info: dict[str, Any]) -> None:
    """Refuses a limit the engine cannot enforce, rather than let it be dropped in silence."""
    for field, value in limits.items():
        if info.get(_ENFORCED[field]) is False:
            asked = params.limits is not None and getattr(params.limits, field) is not None
            where = f"`limits.{_FIELDS[field]}`" if asked else f"the default `limits.{field}` of the config"
            why = info.get("LimitsWhy") or f"its info says {_ENFORCED[field]}: false"
            fix = "leave it out" if asked else f"set `limits.{field} = 0` in the config to run without it"
            raise errors.InvalidParams(
                f"Invalid params: {where} ({value:g}) cannot be enforced by the engine at {engine.host()}: "
                f"{why}; {fix}"
            )


def check_runtime(params: t.CreateSandboxParams, runtime: str, info: dict[str, Any]) -> None:
    runtimes = sorted(info.get("Runtimes") or {})
    if runtime and runtimes and runtime not in runtimes:
        raise errors.BackendUnavailable(
            f"the engine at {engine.host()} has no OCI runtime {runtime!r}; it has {', '.join(runtimes)}",
            {"backend": "docker"},
        )


def create_container(
    client: docker.DockerClient,
    *,
    sandbox_id: str,
    daemon_id: str,
    image: str,
    params: t.CreateSandboxParams,
    hardening: Hardening,
    limits: dict[str, float],
    extra: list[Any],
) -> str:
    """Creates and starts a sandbox's container, with the `extra` mounts of the daemon's; its
    id. Blocks (run it in a thread)."""
    import docker.errors
    import docker.types

    api = client.api
    tmpfs = {"/tmp": f"rw,nosuid,nodev,exec,size={hardening.tmp_size_mb}m,mode=1777"}
    # volumes of their own, removed with the container; each starts as the image's folder,
    # owner included (a tmpfs would not: Docker drops its mode=, Podman refuses its uid=)
    writable = [WORKSPACE, PACKAGES, *([HOME] if hardening.read_only_root else [])]
    mounts = [
        *(docker.types.Mount(target, None, type="volume") for target in writable),
        *(docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in params.mounts),
        *extra,
    ]
    kwargs: dict[str, Any] = {}
    if "memory_mb" in limits:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = f"{int(limits['memory_mb'])}m"
    if "cpus" in limits:
        kwargs["nano_cpus"] = int(limits["cpus"] * 1e9)
    if "pids" in limits:
        kwargs["pids_limit"] = int(limits["pids"])
    if params.network == "none":
        kwargs["network_mode"] = "none"
    runtime = params.runtime or hardening.runtime
    if runtime:
        kwargs["runtime"] = runtime
    host_config = api.create_host_config(
        init=True,
        mounts=mounts,
        tmpfs=tmpfs,
        read_only=hardening.read_only_root,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        **kwargs,
    )
    try:
        created = api.create_container(
            image,
            ["sleep", "infinity"],
            name=f"cellbox-{sandbox_id}",
            environment={"PIP_PREFIX": PACKAGES, **params.env},
            working_dir=WORKSPACE,
            labels={
                LABEL_SANDBOX: sandbox_id,
                LABEL_DAEMON: daemon_id,
                LABEL_DAEMON_PID: str(os.getpid()),
                LABEL_HOST: os.uname().nodename,
            },
            host_config=host_config,
        )
    except docker.errors.APIError as exc:
        hint = ""
        if extra:  # the engine looked like this machine's but may not see the daemon's folders
            hint = ' (where the engine cannot mount this machine\'s folders, set docker_channel = "exec")'
        raise errors.BackendUnavailable(
            f"the engine refused the sandbox's container: {exc.explanation or exc}{hint}",
            {"backend": "docker"},
        ) from None
    container_id: str = created["Id"]
    try:
        ignored = [w for w in created.get("Warnings") or [] if _about_limits(w)]
        if ignored and limits:
            raise errors.InvalidParams(
                f"Invalid params: the engine would not enforce the sandbox's limits: {'; '.join(ignored)}"
            )
        api.start(container_id)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            api.remove_container(container_id, v=True, force=True)
        if isinstance(exc, docker.errors.APIError):
            raise errors.BackendUnavailable(
                f"the sandbox's container did not start: {exc.explanation or exc}", {"backend": "docker"}
            ) from None
        raise
    return container_id


def _about_limits(warning: str) -> bool:
    """Whether an engine's warning says it drops a limit ("... Limitation discarded." from
    Docker, "Resource limits are not supported and ignored ..." from Podman)."""
    text = warning.lower()
    return "discarded" in text or "ignored" in text


def container_state(client: docker.DockerClient, container_id: str) -> str:
    """ "running", or how the container is not: "exited, exit code 137, out of memory",
    "removed"...; blocks."""
    import docker.errors

    try:
        state = client.api.inspect_container(container_id)["State"]
    except docker.errors.NotFound:
        return "removed"
    except docker.errors.APIError as exc:
        return f"unknown: {exc.explanation or exc}"
    status = str(state.get("Status", "unknown"))
    if status == "running":
        return status
    details = [status, *([f"exit code {state['ExitCode']}"] if state.get("ExitCode") is not None else [])]
    return ", ".join([*details, *(["out of memory"] if state.get("OOMKilled") else [])])


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Removes a container and its volumes (the workspace, the packages); blocks."""
    import docker.errors

    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(container_id, v=True, force=True)


class DockerSandbox(SandboxRuntime):
    sandbox_workspace = WORKSPACE
    python = PYTHON

    def __init__(
        self,
        sandbox_id: str,
        client: docker.DockerClient,
        container_id: str,
        image: str,
        unwatch: Callable[[str], None],
        listener: ChannelSocket | None,
    ) -> None:
        super().__init__(sandbox_id)
        self._client = client
        self.container_id = container_id
        self._image = image
        self._unwatch = unwatch
        self._listener = listener  # the faster path of the channel, where there is one
        self._stopped: str | None = None  # why the container is gone, once the engine said so
        self._explaining: set[asyncio.Task[None]] = set()

    def stopped(self, why: str) -> None:
        """The engine says the container stopped: its agent, kernels and commands are gone."""
        self._stopped = why
        if self._channel is not None:
            self._channel.lost(why)

    @property
    def image(self) -> str:
        return self._image

    async def _connect(self, channel: ch.Channel) -> None:
        if self._stopped is not None:
            raise ch.ChannelClosed(f"{self._stopped}: the sandbox's container is not running")
        if self._listener is not None:
            program = ch.program(WORKSPACE, socket=channel_socket.PATH, token=self._listener.expect(channel))
        else:
            program = ch.program(WORKSPACE)

        def ended(why: str) -> None:
            task = asyncio.ensure_future(self._explain(channel, why))
            self._explaining.add(task)
            task.add_done_callback(self._explaining.discard)

        try:
            link = await engine.exec_link(
                self._client, self.container_id, ch.command(PYTHON, program), channel, ended
            )
        except engine.ExecFailed as exc:
            state = await asyncio.to_thread(container_state, self._client, self.container_id)
            if state != "running":  # engines word it each their own way
                raise ch.ChannelClosed(f"the sandbox's container is not running ({state})") from None
            raise ch.ChannelClosed(f"cannot start the agent in the sandbox's container: {exc}") from None
        await channel.start(link, program)
        via = "the exec session" if channel.link is link else "the daemon's socket"
        log.info("%s: the agent's channel is %s", self.sandbox_id, via)

    async def _explain(self, channel: ch.Channel, why: str) -> None:
        """Ends the channel of an exec session that ended, saying why: the container stopped (its
        session may end a moment before the engine says so), or the session alone ended."""
        for _ in range(_STOP_CHECKS):
            if channel.closed.done():  # the engine's event came first
                return
            state = await asyncio.to_thread(container_state, self._client, self.container_id)
            if state != "running":
                channel.lost(f"the sandbox's container stopped ({state})")
                return
            await asyncio.sleep(_STOP_CHECK_EVERY)
        channel.lost(why)

    async def _remove(self) -> None:
        self._unwatch(self.container_id)
        try:
            await asyncio.to_thread(remove_container, self._client, self.container_id)
        finally:
            if self._listener is not None:
                self._listener.close()
