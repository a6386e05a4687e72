"""Sandbox backends, by name: each is one package or module and one entry here.

A backend makes sandboxes (see base.py); the daemon reaches every sandbox the same way, through
the channel to the agent in it.
"""

from __future__ import annotations

from cellbox import types as t
from cellboxd.backends.base import Backend
from cellboxd.config import Resolved


def make(resolved: Resolved, daemon_id: str) -> dict[t.Backend, Backend]:
    """The daemon's backends; each loads its heavy parts when first used."""
    from cellboxd.backends.bubblewrap import BubblewrapBackend
    from cellboxd.backends.docker import DockerBackend
    from cellboxd.backends.local import LocalBackend

    return {
        "local": LocalBackend(resolved),
        "docker": DockerBackend(resolved, daemon_id),
        "bubblewrap": BubblewrapBackend(resolved),
    }
