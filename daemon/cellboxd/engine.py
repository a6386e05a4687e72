"""The daemon's Docker engine: connecting to it, the images sandboxes start from, orphans."""

from __future__ import annotations

import asyncio
import logging

import docker

from cellbox import errors
from cellbox import types as t
from cellboxd import images, inventory
from cellboxd.backends import docker as docker_backend
from cellboxd.backends.base import OnLine
from cellboxd.dependencies import VARIANTS, variant_dependencies

log = logging.getLogger(__name__)

DEFAULT_VARIANT = "minimal"


class DockerEngine:
    def __init__(self, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        self._client: docker.DockerClient | None = None
        self._lock = asyncio.Lock()

    def reachable(self, timeout: float = 3.0) -> bool:
        """Whether an engine answers now (for `initialize`: a quick look, not a wait)."""
        try:
            docker.from_env(timeout=timeout).ping()
        except Exception:
            return False
        return True

    async def client(self) -> docker.DockerClient:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(docker_backend.connect)
            return self._client

    async def resolve_image(self, image: str | None, on_line: OnLine) -> str:
        """The tag to start a sandbox from: a built-in variant is built when missing."""
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
        try:
            client = await self.client()
        except errors.BackendUnavailable:
            return []  # no engine, no containers
        return await asyncio.to_thread(inventory.remove_docker_orphans, client)
