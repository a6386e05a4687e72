"""The daemon's Docker engine: connecting to it, the images sandboxes start from, orphans.

The docker SDK, jupyter_client and the image builder are imported when the engine is first
used, not when the daemon starts: a daemon that never makes a docker sandbox never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import OnLine

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

DEFAULT_VARIANT = "minimal"


class DockerEngine:
    def __init__(self, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        self._client: docker.DockerClient | None = None
        self._lock = asyncio.Lock()

    def reachable(self, timeout: float = 3.0) -> bool:
        """Whether an engine answers now (for `initialize`: a quick look, not a wait).

        An engine on a unix socket or plain TCP gets a `GET /_ping` of a few bytes, so that a
        daemon that never makes a docker sandbox never loads the SDK; others (TLS, ssh) the SDK's
        ping.
        """
        host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        scheme, _, where = host.partition("://")
        if scheme == "unix" or (scheme == "tcp" and not os.environ.get("DOCKER_TLS_VERIFY")):
            return _ping(scheme, where, timeout)
        import docker

        try:
            with contextlib.closing(docker.from_env(timeout=timeout)) as client:
                client.ping()
        except Exception:
            return False
        return True

    async def client(self) -> docker.DockerClient:
        from cellboxd.backends import docker as docker_backend

        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(docker_backend.connect)
            return self._client

    async def resolve_image(self, image: str | None, on_line: OnLine) -> str:
        """The tag to start a sandbox from: a built-in variant is built when missing."""
        from cellboxd import images
        from cellboxd.dependencies import VARIANTS, variant_dependencies

        client = await self.client()
        name = image or DEFAULT_VARIANT
        if name in VARIANTS:
            tag = images.default_tag(name, variant_dependencies(name))
            if await asyncio.to_thread(images.find_image, client, tag) is None:
                on_line(f"building the {name} image {tag} (first use)")
                params = t.BuildImageParams(variant=name)  # type: ignore[arg-type]
                await images.build_image(client, params, on_line=on_line)
            return tag
        if await asyncio.to_thread(images.find_image, client, name) is None:
            raise errors.ImageNotFound(
                f"image {name!r} not found; build it with `cellbox build --tag {name} --dependencies FILE` "
                f"(or cellbox/buildImage), or use a built-in variant: {', '.join(VARIANTS)}",
                {"image": name},
            )
        return name

    async def sweep_orphans(self) -> list[str]:
        """Removes sandbox containers of this machine's daemons that are gone; their sandbox ids."""
        from cellboxd import inventory

        try:
            client = await self.client()
        except errors.BackendUnavailable:
            return []  # no engine, no containers
        return await asyncio.to_thread(inventory.remove_docker_orphans, client)


def _ping(scheme: str, where: str, timeout: float) -> bool:
    try:
        if scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(where)
        else:
            host, _, port = where.rstrip("/").rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status = sock.recv(64).split(b"\r\n", 1)[0]
    except (OSError, ValueError):
        return False
    return status.startswith(b"HTTP/") and status.split()[1:2] == [b"200"]
