"""Every sandbox on this machine, whichever daemon made it, and the removal of orphans.

A daemon that is killed cannot clean up: its sandbox folders (local) and containers (docker,
with their folders of kernel sockets) stay behind. Each carries its daemon's PID (an owner
file, a container label), so the next daemon, or `cellbox prune`, can tell them apart from
those of daemons still running.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cellboxd.backends.base import pid_alive

if TYPE_CHECKING:  # the docker SDK and backend are imported by the functions that need them
    import docker

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
SOCKETS_LINK = "sockets"  # in a sandbox's folder: a symlink to its folder of kernel sockets


class Owner(msgspec.Struct):
    """Who made a sandbox folder: written into it when the sandbox is created."""

    pid: int
    backend: str


class Entry(msgspec.Struct):
    sandbox_id: str
    backend: str
    daemon_pid: int | None
    orphaned: bool
    created_at: str
    image: str | None = None


def claim(root: Path, backend: str) -> None:
    (root / OWNER_FILE).write_bytes(msgspec.json.encode(Owner(os.getpid(), backend)))


def _owner(root: Path) -> Owner | None:
    try:
        return msgspec.json.decode((root / OWNER_FILE).read_bytes(), type=Owner)
    except (OSError, msgspec.DecodeError):
        return None


def _folders(sandboxes_dir: Path) -> list[tuple[Path, Owner]]:
    if not sandboxes_dir.is_dir():
        return []
    found = ((root, _owner(root)) for root in sorted(sandboxes_dir.iterdir()))
    return [(root, owner) for root, owner in found if owner is not None]


def local_sandboxes(sandboxes_dir: Path) -> list[Entry]:
    """The local backend's sandboxes (a docker sandbox's folder is listed with its container)."""
    entries = []
    for root, owner in _folders(sandboxes_dir):
        if owner.backend != "local":
            continue
        created = datetime.datetime.fromtimestamp(root.stat().st_mtime, datetime.UTC)
        entries.append(
            Entry(
                root.name, "local", owner.pid, not pid_alive(owner.pid), created.isoformat(timespec="seconds")
            )
        )
    return entries


def _same_host(labels: dict[str, Any]) -> bool:
    from cellboxd.backends import docker as docker_backend

    return labels.get(docker_backend.LABEL_HOST) == os.uname().nodename


def _container_pid(labels: dict[str, Any]) -> int | None:
    from cellboxd.backends import docker as docker_backend

    try:
        return int(labels.get(docker_backend.LABEL_DAEMON_PID, ""))
    except ValueError:
        return None


def docker_sandboxes(client: docker.DockerClient) -> list[Entry]:
    from cellboxd.backends import docker as docker_backend

    entries: list[Entry] = []
    for container in client.containers.list(all=True, filters={"label": docker_backend.LABEL_SANDBOX}):
        labels: dict[str, Any] = container.labels
        pid = _container_pid(labels)
        # a container of another machine's daemon (a shared engine) is never an orphan of ours
        orphaned = _same_host(labels) and (pid is None or not pid_alive(pid))
        entries.append(
            Entry(
                labels[docker_backend.LABEL_SANDBOX],
                "docker",
                pid,
                orphaned,
                str(container.attrs.get("Created", ""))[:19] + "Z",
                image=(container.image.tags or [container.image.short_id])[0] if container.image else None,
            )
        )
    return entries


def remove_orphan_folders(sandboxes_dir: Path) -> dict[str, str]:
    """Removes the folders, of either backend, whose daemon is gone, with their folders of kernel
    sockets (a docker sandbox's too, even where its container is gone already); the backend of
    each sandbox removed, by its id."""
    removed = {}
    for root, owner in _folders(sandboxes_dir):
        if not pid_alive(owner.pid):
            log.info("removing %s, left by daemon %d", root, owner.pid)
            if (sockets := _linked_sockets(root)) is not None:
                shutil.rmtree(sockets, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            removed[root.name] = owner.backend
    return removed


def _linked_sockets(root: Path) -> Path | None:
    try:
        target = Path(os.readlink(root / SOCKETS_LINK))
    except OSError:
        return None
    return target if target.is_absolute() and target.name == root.name else None


def remove_docker_orphans(client: docker.DockerClient) -> list[str]:
    """Removes the containers, and their folders of kernel sockets, whose daemon is gone."""
    import docker.errors

    from cellboxd.backends import docker as docker_backend

    removed = []
    for container in client.containers.list(all=True, filters={"label": docker_backend.LABEL_SANDBOX}):
        labels: dict[str, Any] = container.labels
        pid = _container_pid(labels)
        if not _same_host(labels) or (pid is not None and pid_alive(pid)):
            continue
        log.info("removing container %s, left by daemon %s", container.name, pid)
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        sandbox_id = labels[docker_backend.LABEL_SANDBOX]
        if (sockets := _sockets_folder(container.attrs, sandbox_id)) is not None:
            shutil.rmtree(sockets, ignore_errors=True)
        removed.append(sandbox_id)
    return removed


def _sockets_folder(attrs: dict[str, Any], sandbox_id: str) -> Path | None:
    """The host folder a sandbox container's kernel sockets were in: its bind mount's source,
    a folder named after the sandbox (a container made by other means is left alone)."""
    from cellboxd.backends import docker as docker_backend

    for mount in attrs.get("Mounts") or []:
        if mount.get("Destination") == docker_backend.SOCKETS and mount.get("Type") == "bind":
            source = Path(mount.get("Source", ""))
            if source.is_absolute() and source.name == sandbox_id:
                return source
    return None
