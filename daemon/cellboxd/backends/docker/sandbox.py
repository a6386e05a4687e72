"""A docker sandbox: one hardened container, reached only through the engine's API.

The container runs `sleep infinity` under docker-init as the image's user (non-root in the
images cellbox builds), with every capability dropped, no-new-privileges, memory, CPU and
process limits (the sandbox's, else the configured defaults), and a read-only root file system.
What it may write: `/tmp` (a tmpfs), the workspace and the packages installed at runtime (an
engine volume each, removed with the container), and the user's `mounts` (folders of the
engine's machine). Nothing of the daemon's machine is mounted.

The agent (sandbox/agent.py) runs in it as one exec session of the engine's API, its stdin and
stdout the sandbox's channel (engine.exec_link): kernels, commands, files and images all go
through it, so the same sandbox works on a local engine, a remote one, Docker Desktop, Podman
or gVisor alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from cellbox import errors
from cellbox import types as t
from cellboxd import channel as ch
from cellboxd.backends.base import SandboxRuntime
from cellboxd.backends.docker import engine
from cellboxd.backends.docker.images import HOME, LABEL_GID, LABEL_UID, PACKAGES, PYTHON, WORKSPACE
from cellboxd.config import DefaultLimits

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

LABEL_SANDBOX = "cellbox.sandbox"
LABEL_DAEMON = "cellbox.daemon"
LABEL_DAEMON_PID = "cellbox.daemon.pid"
LABEL_HOST = "cellbox.daemon.host"

_HOME_MB = 64  # of the tmpfs that is the image user's home, where the root file system is read-only
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


def check_enforced(limits: dict[str, float], params: t.CreateSandboxParams, info: dict[str, Any]) -> None:
    """Refuses a limit the engine cannot enforce, rather than let it be dropped in silence."""
    for field, value in limits.items():
        if info.get(_ENFORCED[field]) is False:
            asked = params.limits is not None and getattr(params.limits, field) is not None
            where = (
                f"`limits.{_FIELDS[field]}`" if asked else f"the default limit `limits.{field}` of the config"
            )
            raise errors.InvalidParams(
                f"Invalid params: {where} ({value:g}) cannot be enforced by the engine at {engine.host()}, "
                f"whose info says {_ENFORCED[field]}: false (rootless Podman on cgroup v1 is one such); "
                + ("leave it out" if asked else f"set `limits.{field} = 0` in the config to run without it")
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
    labels: dict[str, str],
    params: t.CreateSandboxParams,
    hardening: Hardening,
    limits: dict[str, float],
) -> str:
    """Creates and starts a sandbox's container; its id. Blocks (run it in a thread)."""
    import docker.errors
    import docker.types

    api = client.api
    tmpfs = {"/tmp": f"rw,nosuid,nodev,exec,size={hardening.tmp_size_mb}m,mode=1777"}
    if hardening.read_only_root:
        owner = (
            f",uid={labels[LABEL_UID]},gid={labels[LABEL_GID]},mode=0700"
            if LABEL_UID in labels
            else ",mode=1777"
        )
        tmpfs[HOME] = f"rw,nosuid,nodev,size={_HOME_MB}m{owner}"
    mounts = [
        docker.types.Mount(WORKSPACE, None, type="volume"),
        docker.types.Mount(PACKAGES, None, type="volume"),
        *(docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in params.mounts),
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
        raise errors.BackendUnavailable(
            f"the engine refused the sandbox's container: {exc.explanation or exc}", {"backend": "docker"}
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


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Removes a container and its volumes (the workspace, the packages); blocks."""
    import docker.errors

    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(container_id, v=True, force=True)


class DockerSandbox(SandboxRuntime):
    sandbox_workspace = WORKSPACE
    python = PYTHON

    def __init__(self, sandbox_id: str, client: docker.DockerClient, container_id: str, image: str) -> None:
        super().__init__(sandbox_id)
        self._client = client
        self.container_id = container_id
        self._image = image

    @property
    def image(self) -> str:
        return self._image

    async def _connect(self, channel: ch.Channel) -> None:
        program = ch.program(WORKSPACE)
        try:
            link = await engine.exec_link(
                self._client, self.container_id, ch.command(PYTHON, program), channel
            )
        except engine.ExecFailed as exc:
            raise ch.ChannelClosed(f"cannot start the agent in the sandbox's container: {exc}") from None
        await channel.start(link, program)

    async def _remove(self) -> None:
        await asyncio.to_thread(remove_container, self._client, self.container_id)
