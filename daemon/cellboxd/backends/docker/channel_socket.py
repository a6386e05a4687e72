"""The faster path for a sandbox's channel, where the engine runs on the daemon's machine.

Each byte of an exec session passes containerd's shim and the engine before it reaches the
daemon. Where the engine is this machine's, a sandbox's agent can instead connect to a unix
socket the daemon listens on, in a folder of the daemon's (`runtime_dir/<sandbox id>`) that is
mounted read-only into the sandbox at `/run/cellbox`. It is as safe as the exec session: the
daemon only ever accepts on it, and the sandbox can neither replace the socket nor put anything
beside it. The daemon accepts only while an agent starts, so code in the sandbox cannot keep it
busy with connections at other times (they wait in the socket's small backlog). A connection
counts once it has sent the token of the agent being started (given to that agent down its
exec session's stdin): the daemon answers it with a newline. Any other is closed, at the latest
when the agent has started; of those that have not sent a token yet, the oldest goes when too
many wait. An agent that cannot connect, or whose connection is closed unanswered (gVisor, an
engine in a VM, connections of the sandbox's code in its way), stays on its exec session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from cellboxd import channel as ch

if TYPE_CHECKING:
    import docker.types

log = logging.getLogger(__name__)

TARGET = "/run/cellbox"  # the folder, in the sandbox
PATH = f"{TARGET}/channel.sock"
_TOKEN_BYTES = 128  # what a connection may send before its token line ends
_TOKEN_WAIT = 5.0  # seconds a connection gets to send its token
_PENDING = 8  # connections without a token yet, at most; the oldest goes for a new one
_BACKLOG = 8  # connections the kernel holds while the daemon does not accept


class ChannelSocket:
    def __init__(self, folder: Path, listening: socket.socket) -> None:
        self.folder = folder
        self._listening = listening
        self._expected: tuple[str, ch.Channel] | None = None
        self._pending: dict[_Incoming, None] = {}  # in the order they came
        self._accepting: set[asyncio.Task[object]] = set()

    @classmethod
    def open(cls, folder: Path) -> ChannelSocket:
        """Listens in `folder`, a new folder of the daemon's (its parents are private)."""
        os.mkdir(folder, 0o755)  # the sandbox's user, whoever it maps to, may search it
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listening.bind(str(folder / "channel.sock"))
            os.chmod(folder / "channel.sock", 0o666)  # a rootless engine's users are others here
            listening.listen(_BACKLOG)
            listening.setblocking(False)
        except BaseException:
            listening.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, listening)

    def mount(self) -> docker.types.Mount:
        import docker.types

        return docker.types.Mount(TARGET, str(self.folder), type="bind", read_only=True)

    def expect(self, channel: ch.Channel) -> str:
        """The token of the agent `channel` is starting: the connection that sends it is that
        channel's. Accepts until the agent has started (or failed to)."""
        token = secrets.token_hex(16)
        self._expected = (token, channel)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._listening.fileno(), self._accept)
        for future in (channel.hello, channel.closed):
            future.add_done_callback(lambda _: self._started(channel))
        return token

    def _started(self, channel: ch.Channel) -> None:
        if self._expected is None or self._expected[1] is not channel:
            return
        self._expected = None
        self._stop_accepting()
        for incoming in list(self._pending):
            incoming.close()

    def _stop_accepting(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):  # closed, or the loop is
            asyncio.get_running_loop().remove_reader(self._listening.fileno())

    def _accept(self) -> None:
        try:
            connection, _ = self._listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of fds, say: the agent's start fails in time, not the loop
            log.warning("%s: cannot accept on the channel's socket: %s", self.folder.name, exc)
            self._stop_accepting()
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: _Incoming(self), connection))
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    def _take(self, token: bytes) -> ch.Channel | None:
        """The channel of the agent that sent `token`, if it is the expected one and that
        agent is still starting."""
        expected = self._expected
        if expected is None or not hmac.compare_digest(token, expected[0].encode()):
            return None
        channel = expected[1]
        self._started(channel)  # once
        return channel if channel.starting else None

    def close(self) -> None:
        if self._expected is not None:
            self._started(self._expected[1])
        self._listening.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Incoming(ch.TransportLink, asyncio.Protocol):
    """A connection to the socket: nobody's until it sends the expected token, then the link
    of that agent's channel."""

    _transport: asyncio.Transport | None = None

    def __init__(self, socket: ChannelSocket) -> None:
        self._socket = socket
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
        self._socket._pending.pop(self, None)
        channel = self._socket._take(token)
        if channel is None:
            self.close()
            return
        self._unpend()
        self._channel = channel
        assert self._transport is not None
        self._transport.write(b"\n")  # the agent takes this socket once it hears so
        channel.attach(self)
        if rest:
            channel.feed(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._unpend()
        if self._channel is not None:
            self._channel.lost("the agent's connection to the daemon closed")

    def _unpend(self) -> None:
        self._socket._pending.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _writing(self) -> asyncio.WriteTransport | None:
        return self._transport if self._channel is not None else None

    def _reading(self) -> asyncio.ReadTransport | None:
        return self._transport

    def close(self) -> None:
        self._unpend()
        super().close()
