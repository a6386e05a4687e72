"""Docker sandboxes on the engine, of every daemon of this machine, and the removal of orphans.

Each sandbox's container carries its daemon's PID and host name in labels; one whose daemon
on this machine is gone is an orphan. A container of another machine's daemon (an engine
shared by several machines) is never an orphan of ours.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from cellboxd.backends.base import pid_alive
from cellboxd.backends.docker.sandbox import LABEL_DAEMON_PID, LABEL_HOST, LABEL_SANDBOX, remove_container
from cellboxd.inventory import Entry

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)


def _ours(labels: dict[str, Any]) -> bool:
    return labels.get(LABEL_HOST) == os.uname().nodename


def _daemon_pid(labels: dict[str, Any]) -> int | None:
    try:
        return int(labels.get(LABEL_DAEMON_PID, ""))
    except ValueError:
        return None


def _orphaned(labels: dict[str, Any]) -> bool:
    pid = _daemon_pid(labels)
    return _ours(labels) and (pid is None or not pid_alive(pid))


def _sandbox_containers(client: docker.DockerClient) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": LABEL_SANDBOX}))


def entries(client: docker.DockerClient) -> list[Entry]:
    found: list[Entry] = []
    for container in _sandbox_containers(client):
        labels: dict[str, Any] = container.labels
        image = container.attrs.get("Config", {}).get("Image") or None
        found.append(
            Entry(
                labels[LABEL_SANDBOX],
                "docker",
                _daemon_pid(labels),
                _orphaned(labels),
                str(container.attrs.get("Created", ""))[:19] + "Z",
                image=image if image and not str(image).startswith("sha256:") else None,
            )
        )
    return found


def remove(client: docker.DockerClient) -> list[str]:
    """Removes the containers (and their volumes) whose daemon is gone; their sandbox ids."""
    removed = []
    for container in _sandbox_containers(client):
        labels: dict[str, Any] = container.labels
        if _orphaned(labels):
            log.info("removing container %s, left by daemon %s", container.name, _daemon_pid(labels))
            remove_container(client, container.id)
            removed.append(labels[LABEL_SANDBOX])
    return removed
