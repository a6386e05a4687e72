"""Every sandbox on this machine, whichever daemon made it, and the removal of orphans.

A daemon that is killed cannot clean up: its sandbox folders (local) and containers (docker)
stay behind. Each carries its daemon's PID (a `daemon.pid` file, a container label), so the
next daemon, or `cellbox prune`, can tell them apart from those of daemons still running.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import docker
import docker.errors
import msgspec

from cellboxd.backends import docker as docker_backend
from cellboxd.backends.base import pid_alive

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"


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
    return labels.get(docker_backend.LABEL_HOST) == os.uname().nodename


def _container_pid(labels: dict[str, Any]) -> int | None:
    try:
        return int(labels.get(docker_backend.LABEL_DAEMON_PID, ""))
    except ValueError:
        return None


def docker_sandboxes(client: docker.DockerClient) -> list[Entry]:
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


def remove_orphan_folders(sandboxes_dir: Path) -> list[str]:
    """Removes the folders, of either backend, whose daemon is gone."""
    removed = []
    for root, owner in _folders(sandboxes_dir):
        if not pid_alive(owner.pid):
            log.info("removing %s, left by daemon %d", root, owner.pid)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root.name)
    return removed


def remove_docker_orphans(client: docker.DockerClient) -> list[str]:
    removed = []
    for container in client.containers.list(all=True, filters={"label": docker_backend.LABEL_SANDBOX}):
        labels: dict[str, Any] = container.labels
        pid = _container_pid(labels)
        if not _same_host(labels) or (pid is not None and pid_alive(pid)):
            continue
        log.info("removing container %s, left by daemon %s", container.name, pid)
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        removed.append(labels[docker_backend.LABEL_SANDBOX])
    return removed
