"""The `docker` backend: a sandbox is a hardened container on any engine the docker SDK reaches.

Its parts: `engine` (connecting, exec sessions), `images` (builds from dependency files,
pulls), `dependencies` (Poetry's format), `sandbox` (the container and its agent), `orphans`.
The docker SDK and poetry-core are loaded when a docker sandbox or image is first asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import Key, OnLine, SandboxRuntime
from cellboxd.backends.docker import channel_socket, engine
from cellboxd.backends.docker.channel_socket import ChannelSocket
from cellboxd.config import Resolved
from cellboxd.inventory import Entry

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

DEFAULT_VARIANT = "minimal"
_EVENTS_RETRY = 1.0  # seconds before the stream of the engine's events is opened again


class _Watcher:
    """The engine's container events, one stream for all the daemon's sandboxes (a thread):
    a container that stops (killed from outside, out of memory, its runtime gone) ends its
    sandbox's channel at once, whatever its exec session does meanwhile."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._stopped: dict[str, Callable[[str], None]] = {}  # container id -> what to tell
        self._thread: threading.Thread | None = None

    def watch(self, container_id: str, stopped: Callable[[str], None]) -> None:
        self._stopped[container_id] = stopped
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
            self._thread.start()

    def forget(self, container_id: str) -> None:
        self._stopped.pop(container_id, None)

    def _run(self) -> None:
        while True:
            try:
                for event in self._client.events(decode=True, filters={"type": "container", "event": "die"}):
                    actor = event.get("Actor") or {}
                    container_id = event.get("id") or actor.get("ID")
                    if container_id in self._stopped:
                        code = (actor.get("Attributes") or {}).get("exitCode", "?")
                        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon left
                            self._loop.call_soon_threadsafe(self._tell, container_id, f"exit code {code}")
            except Exception as exc:
                log.debug("the engine's event stream ended: %s", exc)
            time.sleep(_EVENTS_RETRY)

    def _tell(self, container_id: str, how: str) -> None:
        stopped = self._stopped.pop(container_id, None)
        if stopped is not None:
            stopped(f"the sandbox's container stopped ({how})")


async def _in_thread(client: docker.DockerClient, create: Callable[[], str]) -> str:
    """Makes a container in a thread that runs to its end even when the caller is cancelled
    (the client gave up, the daemon is leaving), so that what it made is removed, not left."""
    from cellboxd.backends.docker import sandbox

    creating = asyncio.ensure_future(asyncio.to_thread(create))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(sandbox.remove_container, client, await creating)
        raise


class DockerBackend:
    name: t.Backend = "docker"

    def __init__(self, resolved: Resolved, daemon_id: str) -> None:
        self._resolved = resolved
        self.daemon_id = daemon_id
        self._client: docker.DockerClient | None = None
        self._info: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._variants: dict[str, asyncio.Task[t.BuildImageResult]] = {}  # checked by this daemon
        self._watcher: _Watcher | None = None

    @property
    def place(self) -> str:
        return engine.host()

    def available(self) -> bool:
        return engine.reachable()

    def validate(self, params: t.CreateSandboxParams) -> None:
        from cellboxd.backends.docker.images import HOME, PACKAGES, WORKSPACE

        own = (WORKSPACE, PACKAGES, HOME, "/tmp")
        for index, mount in enumerate(params.mounts):
            if not mount.source.startswith("/") or not mount.target.startswith("/"):
                raise errors.InvalidParams(
                    f"Invalid params: `mounts[{index}]`: `source` (a folder of the engine's machine) and "
                    "`target` (in the sandbox) must be absolute paths"
                )
            target = mount.target.rstrip("/") or "/"
            if target in own or (target + "/").startswith(f"{channel_socket.TARGET}/"):
                raise errors.InvalidParams(
                    f"Invalid params: `mounts[{index}].target`: {target} is the sandbox's own "
                    f"(its workspace, packages, home, /tmp and {channel_socket.TARGET}); mount below "
                    "the workspace or elsewhere"
                )

    def pool_key(self, image: str | None) -> Key:
        return (self.name, image or DEFAULT_VARIANT)

    async def client(self) -> docker.DockerClient:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(engine.connect)
            return self._client

    async def _engine_info(self) -> dict[str, Any]:
        """The engine's `info` (what it enforces, its runtimes), asked once."""
        if self._info is None:
            from cellboxd.backends.docker import sandbox

            client = await self.client()
            info = self._info = await asyncio.to_thread(sandbox.engine_facts, client)
            return info
        return self._info

    async def create(
        self, sandbox_id: str, root: Path, params: t.CreateSandboxParams, on_line: OnLine
    ) -> SandboxRuntime:
        from cellboxd.backends.docker import sandbox

        settings = self._resolved.settings
        client = await self.client()
        info = await self._engine_info()
        limits = sandbox.limits_of(params, settings.limits)
        sandbox.check_enforced(limits, params, info)
        sandbox.check_runtime(params, params.runtime or settings.docker_runtime, info)
        tag = await self.resolve_image(params.image, on_line)
        hardening = sandbox.Hardening(
            settings.limits, settings.read_only_root, settings.tmp_size_mb, settings.docker_runtime
        )
        listener = None
        if settings.docker_channel == "auto" and engine.on_this_machine(info):
            listener = ChannelSocket.open(self._resolved.runtime_path / sandbox_id)
        if self._watcher is None:
            self._watcher = _Watcher(client)
        try:
            container_id = await _in_thread(
                client,
                functools.partial(
                    sandbox.create_container,
                    client,
                    sandbox_id=sandbox_id,
                    daemon_id=self.daemon_id,
                    image=tag,
                    params=params,
                    hardening=hardening,
                    limits=limits,
                    extra=[listener.mount()] if listener is not None else [],
                ),
            )
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        made = sandbox.DockerSandbox(sandbox_id, client, container_id, tag, self._watcher.forget, listener)
        self._watcher.watch(container_id, made.stopped)
        return made

    async def resolve_image(self, image: str | None, on_line: OnLine) -> str:
        """The tag to start a sandbox from: a built-in variant is built when missing (or out of
        date), another image pulled when it is not on the engine."""
        from cellboxd.backends.docker import images
        from cellboxd.backends.docker.dependencies import VARIANTS

        client = await self.client()
        name = image or DEFAULT_VARIANT
        if name in VARIANTS:
            # built when missing or out of date (another cellbox built it), checked once per daemon
            if name not in self._variants or self._variants[name].cancelled():
                params = t.BuildImageParams(variant=name)  # type: ignore[arg-type]
                self._variants[name] = asyncio.ensure_future(
                    images.build_image(client, params, on_line=on_line)
                )
            try:
                name = (await asyncio.shield(self._variants[name])).tag
            except Exception:
                del self._variants[name]
                raise
        if await asyncio.to_thread(images.find_image, client, name) is None:
            loop = asyncio.get_running_loop()

            def emit(line: str) -> None:
                loop.call_soon_threadsafe(on_line, line)

            try:
                await asyncio.to_thread(images.pull, client, name, emit)
            except errors.ImageNotFound as exc:
                raise errors.ImageNotFound(
                    f"image {name!r} is not on the engine and {exc.message}; build it with `cellbox build "
                    f"--tag {name} --dependencies FILE` (or cellbox/buildImage), or use a built-in variant: "
                    f"{', '.join(VARIANTS)}",
                    {"image": name},
                ) from None
        return name

    async def build_image(self, params: t.BuildImageParams, on_line: OnLine) -> t.BuildImageResult:
        from cellboxd.backends.docker import images

        return await images.build_image(await self.client(), params, on_line=on_line)

    async def list_images(self) -> list[t.ImageInfo]:
        from cellboxd.backends.docker import images

        return await asyncio.to_thread(images.list_images, await self.client())

    def entries(self) -> list[Entry]:
        from cellboxd.backends.docker import orphans

        with contextlib.closing(engine.connect(timeout=5)) as client:
            return orphans.entries(client)

    async def remove_orphans(self) -> list[str]:
        from cellboxd.backends.docker import orphans

        try:
            client = await self.client()
        except errors.BackendUnavailable:
            return []  # no engine, no containers
        return await asyncio.to_thread(orphans.remove, client)
