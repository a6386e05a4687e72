"""The faster path for a sandbox's channel, where the engine runs on the daemon's machine.

Each byte of an exec session passes containerd's shim and the engine before it reaches the
daemon. Where the engine is this machine's, a sandbox's agent can instead connect to a unix
socket the daemon listens on, in a folder of the daemon's (`runtime_dir/<sandbox id>`) that is
mounted read-only into the sandbox at `/run/cellbox`. It is as safe as the exec session: the
daemon only ever accepts on it, and the sandbox can neither replace the socket nor put anything
beside it. A connection counts once it has sent the token of the agent being started (given to
that agent down its exec session's stdin), and only while that agent starts: the daemon answers
it with a newline. Any other is closed; of those that have not sent a token yet, the oldest
goes when too many wait. An agent that cannot reach the socket, or gets no answer (gVisor, an
engine in a VM, connections of the sandbox's code in its way), stays on its exec session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cellboxd import channel as ch

if TYPE_CHECKING:
    import docker.types

TARGET = "/run/cellbox"  # the folder, in the sandbox
PATH = f"{TARGET}/channel.sock"
_TOKEN_BYTES = 128  # what a connection may send before its token line ends
_TOKEN_WAIT = 5.0  # seconds a connection gets to send its token
_PENDING = 8  # connections without a token yet, at most; more are closed at once


class ChannelSocket:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._server: asyncio.AbstractServer | None = None
        self._expected: tuple[str, ch.Channel] | None = None
        self._pending: dict[_Incoming, None] = {}  # in the order they came

    @classmethod
    async def open(cls, folder: Path) -> ChannelSocket:
        """Listens in `folder`, a new folder of the daemon's (its parents are private)."""
        os.mkdir(folder, 0o755)  # the sandbox's user, whoever it maps to, may search it
        made = cls(folder)
        try:
            made._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Incoming(made), str(folder / "channel.sock")
            )
            os.chmod(folder / "channel.sock", 0o666)  # a rootless engine's users are others here
        except BaseException:
            made.close()
            raise
        return made

    def mount(self) -> docker.types.Mount:
        import docker.types

        return docker.types.Mount(TARGET, str(self.folder), type="bind", read_only=True)

    def expect(self, channel: ch.Channel) -> str:
        """The token of the agent `channel` is starting: its connection is that channel's."""
        token = secrets.token_hex(16)
        self._expected = (token, channel)
        return token

    def _take(self, token: bytes) -> ch.Channel | None:
        expected = self._expected
        if expected is None or not hmac.compare_digest(token, expected[0].encode()):
            return None
        self._expected = None  # once
        return expected[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for incoming in list(self._pending):
            incoming.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Incoming(ch.TransportLink, asyncio.Protocol):
    """A connection to the socket: nobody's until it sends the expected token, then the link
    of that agent's channel."""

    def __init__(self, socket: ChannelSocket) -> None:
        self._socket = socket
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._channel: ch.Channel | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        pending = self._socket._pending
        if len(pending) >= _PENDING:
            next(iter(pending)).close()
        pending[self] = None
        self._timer = asyncio.get_running_loop().call_later(_TOKEN_WAIT, self.close)

    def data_received(self, data: bytes) -> None:
        if self._channel is not None:
            self._channel.feed(data)
            return
        self._head += data
        token, newline, rest = self._head.partition(b"\n")
        if not newline:
            if len(self._head) > _TOKEN_BYTES:
                self.close()
            return
        channel = self._socket._take(token)
        self._socket._pending.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        if channel is None:
            self.close()
            return
        self._channel = channel
        assert self._transport is not None
        self._transport.write(b"\n")  # the agent takes this socket once it hears so
        channel.attach(self)
        if rest:
            channel.feed(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._socket._pending.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        if self._channel is not None:
            self._channel.lost("the agent's connection to the daemon closed")

    def _writing(self) -> asyncio.WriteTransport | None:
        return self._transport if self._channel is not None else None

    def _reading(self) -> asyncio.ReadTransport | None:
        return self._transport

    def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._transport.close()
