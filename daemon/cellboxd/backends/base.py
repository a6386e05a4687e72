"""What a backend is, and what the rest of the daemon needs from the sandboxes it makes.

A backend makes sandboxes and finds the ones daemons that were killed left behind. Each of its
sandboxes runs the agent (sandbox/agent.py) and is reached only through the agent's channel:
kernels, commands and files all go through it, whichever backend made the sandbox. The
backend's own part is to make the sandbox, to start an agent in it (`_connect`), and to
remove it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cellbox import errors
from cellbox import types as t
from cellboxd import channel as ch

if TYPE_CHECKING:
    from cellboxd.config import Resolved
    from cellboxd.inventory import Entry

log = logging.getLogger(__name__)

OnLine = Callable[[str], None]

Key = tuple[t.Backend, str | None]
"""What the warm pool keeps sandboxes by: the backend, and the image (or None)."""


class SandboxRuntime(abc.ABC):
    """A sandbox as a backend made it, reached through the channel to its agent.

    The agent is started on first use and started again when it is gone (a cell killed it):
    what it ran then is gone with it, the sandbox's files and packages are not.
    """

    sandbox_workspace: str
    """The workspace as the sandbox's kernels see it: their working directory."""
    python: str
    """The sandbox's interpreter."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._channel: ch.Channel | None = None
        self._connecting = asyncio.Lock()
        self.closed = False

    @property
    def workspace(self) -> Path | None:
        """The workspace's folder on the daemon's machine, where that machine can see it."""
        return None

    @property
    def image(self) -> str | None:
        return None

    @property
    def uv(self) -> str | None:
        """uv for installs, where the sandbox has it; else pip is used."""
        return None

    def env(self) -> dict[str, str]:
        """What kernels and commands get on top of the agent's own environment."""
        return {}

    async def channel(self) -> ch.Channel:
        """The channel to the sandbox's agent, started when there is none (or it is gone)."""
        async with self._connecting:
            if self.closed:
                raise ch.ChannelClosed("the sandbox was destroyed")
            if self._channel is None or self._channel.closed.done():
                channel = ch.Channel(self.sandbox_id)
                try:
                    await self._connect(channel)
                except BaseException:
                    channel.close()
                    raise
                self._channel = channel
            return self._channel

    @abc.abstractmethod
    async def _connect(self, channel: ch.Channel) -> None:
        """Starts an agent in the sandbox and `channel.start`s the channel over its link."""

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> ch.RunResult:
        """Runs a command in the sandbox (in its workspace, as its kernels would)."""
        try:
            return await (await self.channel()).run(argv, self.env(), on_line)
        except (ch.ChannelClosed, ch.AgentError) as exc:
            raise errors.RequestFailed(f"cannot run {argv[0]!r} in the sandbox: {exc}") from None

    async def close(self) -> None:
        """Stops the agent (and so every kernel and command) and removes the sandbox."""
        self.closed = True
        if self._channel is not None:
            self._channel.close()
        await self._remove()

    @abc.abstractmethod
    async def _remove(self) -> None:
        """Removes what the backend made for the sandbox."""


class Backend(Protocol):
    """One kind of sandbox; `backends.BACKENDS` names them."""

    name: t.Backend

    @property
    def place(self) -> str:
        """Where its sandboxes are (the Docker engine's address; "" for this machine), so that
        a sweep of orphans takes only those it can remove."""
        ...

    def available(self) -> bool:
        """Whether sandboxes can be made now (a quick look, for `initialize`)."""
        ...

    def validate(self, params: t.CreateSandboxParams) -> None:
        """InvalidParams naming the field that this backend does not take."""
        ...

    def pool_key(self, image: str | None) -> Key:
        """The warm pool's key for sandboxes of this image (None: the default)."""
        ...

    async def create(
        self, sandbox_id: str, root: Path, params: t.CreateSandboxParams, on_line: OnLine
    ) -> SandboxRuntime:
        """A new sandbox; `root` is its folder of the daemon's, made and claimed already."""
        ...

    def entries(self) -> list[Entry]:
        """This backend's sandboxes on this machine, of every daemon (for `cellbox ps`); blocks."""
        ...

    async def remove_orphans(self) -> list[str]:
        """Removes the sandboxes of daemons that are gone; their ids."""
        ...


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs under `pid` (a daemon that left sandboxes behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


BackendFactory = Callable[["Resolved"], Backend]
