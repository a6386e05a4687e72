"""TCP forwarding into a container through `docker exec`, for sandboxes without a network.

A container with `network: "none"` has no ports to publish. Each kernel port then gets a
listener on the daemon's loopback; every connection to it starts a tiny forwarder in the
container (`exec` with stdin attached) that connects to the kernel's port on the
container's own loopback, and bytes are pumped both ways over the engine's API stream, the
way `kubectl port-forward` works. It needs nothing from the network and works wherever the
engine's API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import docker

log = logging.getLogger(__name__)

# Runs in the container: connects to 127.0.0.1:argv[1], then relays stdin -> socket -> stdout.
_FORWARDER = r"""
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            s.sendall(data)
    finally:
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    while data:
        data = data[os.write(1, data):]
"""
_STDOUT = 1


class PortForward:
    """Listeners on 127.0.0.1 that reach ports inside one container."""

    def __init__(self, client: docker.DockerClient, container_id: str, python: str) -> None:
        self._client = client
        self._container_id = container_id
        self._python = python
        self._servers: list[asyncio.Server] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def listen(self, container_port: int) -> int:
        """A new loopback port that leads to `container_port` in the container."""

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._pumps.add(task)
            try:
                await self._pump(container_port, reader, writer)
            finally:
                self._pumps.discard(task)
                writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._pumps):
            task.cancel()
        self._servers.clear()

    def _open(self, container_port: int) -> tuple[Any, socket.socket]:
        api = self._client.api
        exec_id = api.exec_create(
            self._container_id, [self._python, "-c", _FORWARDER, str(container_port)], stdin=True
        )["Id"]
        handle = api.exec_start(exec_id, socket=True)
        raw = getattr(handle, "_sock", handle)
        if not isinstance(raw, socket.socket):
            raise RuntimeError("this engine connection cannot carry a forwarded port")
        return handle, raw

    async def _pump(
        self, container_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            # `_handle` keeps the engine's HTTP response, and so the socket, alive while in use
            _handle, raw = await asyncio.to_thread(self._open, container_port)
        except Exception as exc:
            log.debug("cannot forward to container port %d: %s", container_port, exc)
            return
        raw.setblocking(False)
        inner_reader, inner_writer = await asyncio.open_connection(sock=raw)

        async def up() -> None:
            while data := await reader.read(65536):
                inner_writer.write(data)
                await inner_writer.drain()
            if inner_writer.can_write_eof():
                inner_writer.write_eof()

        async def down() -> None:
            # the exec's output is multiplexed: 8-byte headers (stream, 0, 0, 0, size) then data
            while True:
                header = await inner_reader.readexactly(8)
                payload = await inner_reader.readexactly(int.from_bytes(header[4:], "big"))
                if header[0] == _STDOUT:
                    writer.write(payload)
                    await writer.drain()
                else:
                    log.debug("forwarder for port %d: %r", container_port, payload[:200])

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
            inner_writer.close()
