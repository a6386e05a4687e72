"""Every sandbox on this machine, whichever daemon made it, and the removal of orphans.

A daemon that is killed cannot clean up. Every sandbox has a folder in the data dir, whatever
its backend, with an owner file naming its daemon's PID and its backend; so the next daemon,
or `cellbox prune`, tells them apart from those of daemons still running, removes the folders
of those that are gone, and asks their backends to remove the rest (docker: the containers).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import msgspec

from cellboxd.backends.base import pid_alive

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"


class Owner(msgspec.Struct):
    """Who made a sandbox folder, and where its sandbox is (a backend's `place`, e.g. the Docker
    engine): written into it when the sandbox is created."""

    pid: int
    backend: str
    place: str = ""


class Entry(msgspec.Struct):
    sandbox_id: str
    backend: str
    daemon_pid: int | None
    orphaned: bool
    created_at: str
    image: str | None = None


def claim(root: Path, backend: str, place: str) -> None:
    (root / OWNER_FILE).write_bytes(msgspec.json.encode(Owner(os.getpid(), backend, place)))


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


def local_sandboxes(sandboxes_dir: Path, backend: str) -> list[Entry]:
    """The sandboxes of a backend of this machine's folders (local, bubblewrap); the docker
    backend lists its own from the engine's records."""
    entries = []
    for root, owner in _folders(sandboxes_dir):
        if owner.backend != backend:
            continue
        created = datetime.datetime.fromtimestamp(root.stat().st_mtime, datetime.UTC)
        entries.append(
            Entry(
                root.name, backend, owner.pid, not pid_alive(owner.pid), created.isoformat(timespec="seconds")
            )
        )
    return entries


def remove_orphan_folders(
    sandboxes_dir: Path, runtime_dir: Path, places: Mapping[str, str]
) -> dict[str, str]:
    """Removes the sandbox folders whose daemon is gone, with the folder of each in the runtime
    dir (a local agent's sockets); the backend of each, by sandbox id. Only those of the
    `places` (backend -> place) are taken: a folder whose sandbox is on another engine is left
    for a daemon that uses that engine, which can remove the rest too."""
    removed = {}
    for root, owner in _folders(sandboxes_dir):
        if places.get(owner.backend) == owner.place and not pid_alive(owner.pid):
            log.info("removing %s, left by daemon %d", root, owner.pid)
            shutil.rmtree(runtime_dir / root.name, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            removed[root.name] = owner.backend
    return removed
