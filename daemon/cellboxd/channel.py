"""The daemon's end of a sandbox's channel: one byte stream to the agent inside the sandbox.

Every backend starts the same agent (sandbox/agent.py) and hands its stdin and stdout to a
`Channel` through a `Link`: a child's pipes (local), an exec session of the engine's API
(docker), or a socket the daemon listens on that the agent connects to (docker, on an engine
of this machine: backends/docker/channel_socket.py). The channel carries every kernel's Jupyter
messages, output credits, commands and file operations (framing in sandbox/wire.py), so the
daemon never opens, follows or connects to a path that the sandbox's code can create or
replace. What comes out of it is the sandbox's word: a frame that breaks the framing ends the
channel, and nothing in it is trusted further.

Kernel messages queue per kernel (`KernelPort`); while more than `HIGH_WATER` bytes of them
wait to be taken, the channel stops reading the link, so that a flood waits in the sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from cellboxd import mcptools
from cellboxd.sandbox import outputs, wire

log = logging.getLogger(__name__)

HIGH_WATER = 8 << 20  # bytes of kernel messages waiting before the link is not read
HELLO_TIMEOUT = 30.0  # seconds for a new agent to say hello
CALL_TIMEOUT = 30.0  # seconds an agent gets to answer a call; it answers at once when it lives
RUN_OUTPUT_CAP = 4 << 20  # bytes of a command's output kept (its end), per stream
COMPLAINTS_CAP = 64 << 10  # bytes of an agent's stderr logged; the rest is dropped

# Runs the agent: reads N bytes of code from stdin and runs them (see `program`).
BOOT = "import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),'<cellbox-agent>','exec'))"
_MODULES = ("wire", "files", "outputs", "agent")  # of cellboxd.sandbox, in the order they are defined
# The largest frame of each type the daemon takes from an agent (a larger one ends the channel):
# whatever the sandbox's code does, the daemon holds no more than that of one frame. Replies
# carry file pieces or listings (at most sandbox/files.LIST_BYTES); events, command output in MiBs.
AGENT_FRAMES = {
    wire.KERNEL: outputs.MESSAGE_BOUND,
    wire.EVENT: 4 << 20,
    wire.REPLY: wire.MAX_FILE_PIECE + (32 << 20),
}


class Link(Protocol):
    """How a channel's bytes move, made by a backend; it feeds what it reads to the channel."""

    def write(self, data: bytes) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class TransportLink:
    """A link's writing and flow control over asyncio transports: it writes to one and pauses
    reading another (the same one for a socket); closing it closes `_transport`."""

    _transport: asyncio.BaseTransport | None = None

    def _writing(self) -> asyncio.WriteTransport | None:
        raise NotImplementedError

    def _reading(self) -> asyncio.ReadTransport | None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if (transport := self._writing()) is not None and not transport.is_closing():
            transport.write(data)

    def pause_reading(self) -> None:
        if (transport := self._reading()) is not None:
            transport.pause_reading()

    def resume_reading(self) -> None:
        if (transport := self._reading()) is not None:
            transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._transport.close()


class ChildLink(TransportLink, asyncio.SubprocessProtocol):
    """A link over a child process's stdin and stdout; `received` gets its stdout, `complained`
    its stderr."""

    def __init__(self) -> None:
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.received(data)
        else:
            self.complained(data)

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def complained(self, data: bytes) -> None:
        raise NotImplementedError

    def _pipe(self, fd: int) -> Any:
        return None if self._transport is None else self._transport.get_pipe_transport(fd)

    def _writing(self) -> asyncio.WriteTransport | None:
        pipe: asyncio.WriteTransport | None = self._pipe(0)
        return pipe

    def _reading(self) -> asyncio.ReadTransport | None:
        pipe: asyncio.ReadTransport | None = self._pipe(1)
        return pipe


class ChannelClosed(Exception):
    """The agent is gone (the sandbox's container stopped, a cell killed it, it misbehaved)."""


class AgentError(Exception):
    """The agent refused an operation: `kind` is "invalid", "not_found", "exists" or "failed"."""

    def __init__(self, kind: str, message: str, path: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path = path


class RunResult(msgspec.Struct):
    returncode: int
    stdout: str
    stderr: str


class Exit(msgspec.Struct):
    """How a kernel process ended: its exit code (None when the agent went away) and output."""

    code: int | None
    output: str = ""


def command(python: str, program: bytes) -> list[str]:
    """The command line that starts the agent with `python`; `program` then goes to its stdin."""
    return [python, "-I", "-B", "-c", BOOT, str(len(program))]


def program(workspace: str, folder: str | None = None, socket: str | None = None, token: str = "") -> bytes:
    """The agent's code, which serves the workspace at `workspace` (as the sandbox sees it) and
    keeps its kernels' sockets in `folder` (a new temporary folder when None); with `socket`
    it connects there with `token` (see `attach`), where it can."""
    return _SOURCE + f"_agent.main({workspace!r}, {folder!r}, {socket!r}, {token!r})\n".encode()


def _source() -> bytes:
    here = Path(__file__).parent / "sandbox"
    lines = [
        "import sys, types",
        "for _name in ('cellboxd', 'cellboxd.sandbox'):",
        "    sys.modules[_name] = types.ModuleType(_name)",
        "    sys.modules[_name].__path__ = []",
        "def _define(name, source):",
        "    module = sys.modules['cellboxd.sandbox.' + name] = types.ModuleType('cellboxd.sandbox.' + name)",
        "    module.__file__ = '<cellbox-agent>/' + name + '.py'",
        "    exec(compile(source, module.__file__, 'exec'), module.__dict__)",
        "    setattr(sys.modules['cellboxd.sandbox'], name, module)",
        "    return module",
    ]
    lines += [f"_agent = _define({name!r}, {(here / f'{name}.py').read_text()!r})" for name in _MODULES]
    return ("\n".join(lines) + "\n").encode()


_SOURCE = _source()


class KernelPort:
    """One kernel process's end of the channel: its messages in arrival order, and its exit."""

    def __init__(self, channel: Channel, slot: int) -> None:
        self.slot = slot
        self._channel = channel
        self._queue: collections.deque[tuple[int, list[memoryview], int]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.exited: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        # the kernel's calls of MCP tools: (call, request) as they come, and a call given up
        self.on_tool: Callable[[int, bytes], None] | None = None
        self.on_tool_cancel: Callable[[int], None] | None = None

    def _put(self, channel: int, parts: list[memoryview], size: int) -> None:
        self._queue.append((channel, parts, size))
        self._wake()

    def _end(self, exit: Exit) -> None:
        if not self.exited.done():
            self.exited.set_result(exit)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> tuple[int, list[memoryview], int] | None:
        """The next message (its channel, its parts and its size in bytes); None once the process
        has ended and every message it sent has been taken."""
        while not self._queue:
            if self.exited.done():
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._queue.popleft()
        self._channel._taken(message[2])
        return message

    def waiting(self) -> bool:
        """Whether messages wait to be taken."""
        return bool(self._queue)

    def send(self, channel: int, parts: list[bytes]) -> None:
        self._channel._send(wire.kernel_frame(self.slot, channel, parts))

    def credit(self, count: int) -> None:
        self._channel._send(wire.credit_frame(self.slot, count))

    async def signal(self, signum: int) -> None:
        await self._channel.call("kernel.signal", slot=self.slot, signum=signum)

    async def answer_tool(self, call: int, reply: bytes) -> None:
        """Answers one of the kernel's calls of an MCP tool (a JSON object, see mcptools)."""
        await self._channel._answer_tool(call, reply)

    async def output(self) -> str:
        """The end of what the kernel process wrote to its stdout and stderr."""
        with contextlib.suppress(ChannelClosed, AgentError):
            result, _ = await self._channel.call("kernel.output", slot=self.slot)
            return str(result.get("output", ""))
        return ""

    def close(self) -> None:
        """Lets the process's messages go, those not taken too."""
        self._channel._ports.pop(self.slot, None)
        for call in [c for c, port in self._channel._tool_calls.items() if port is self]:
            del self._channel._tool_calls[call]
        self._channel._taken(sum(size for _, _, size in self._queue))
        self._queue.clear()
        self._end(Exit(None))


class _Run:
    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.output: dict[str, collections.deque[bytes]] = {
            "stdout": collections.deque(),
            "stderr": collections.deque(),
        }
        self.sizes = {"stdout": 0, "stderr": 0}
        self.partial = {"stdout": b"", "stderr": b""}
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def add(self, stream: str, data: bytes) -> None:
        if stream not in self.output:
            return
        kept = self.output[stream]
        kept.append(data)
        self.sizes[stream] += len(data)
        while self.sizes[stream] > RUN_OUTPUT_CAP and len(kept) > 1:
            self.sizes[stream] -= len(kept.popleft())
        if self.on_line is not None:
            *lines, self.partial[stream] = (self.partial[stream] + data).split(b"\n")
            if len(self.partial[stream]) > 1 << 16:  # a line without end is shown in pieces
                lines.append(self.partial[stream])
                self.partial[stream] = b""
            for line in lines:
                self.on_line(line.decode(errors="replace"))

    def text(self, stream: str) -> str:
        if self.on_line is not None and self.partial[stream]:
            self.on_line(self.partial[stream].decode(errors="replace"))
            self.partial[stream] = b""
        return b"".join(self.output[stream])[-RUN_OUTPUT_CAP:].decode(errors="replace")


class Channel:
    """The daemon's end of one agent's channel; `name` says whose, in log lines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._link: Link | None = None  # where frames go
        self._links: list[Link] = []  # every link of the agent's, closed with the channel
        self._parser = wire.Parser(AGENT_FRAMES)
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._ports: dict[int, KernelPort] = {}
        self._tool_calls: dict[int, KernelPort] = {}  # calls of MCP tools not answered yet
        self._refusals: set[asyncio.Future[None]] = set()  # answers to calls no kernel serves
        self._runs: dict[int, _Run] = {}
        self._slots = itertools.count(1)
        self._queued = 0  # bytes of kernel messages not taken yet
        self._paused = False
        self._pauses = 0  # how often the link was paused: a call's deadline waits on for those
        self._complaints = 0  # bytes of the agent's stderr logged so far
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()  # why it ended

    # -- the link's side --------------------------------------------------------------------

    async def start(self, link: Link, agent: bytes) -> dict[str, Any]:
        """Sends the agent its code over `link` and waits for its hello (over `link`, or over
        one attached meanwhile)."""
        timeout = HELLO_TIMEOUT
        self._link = link
        self._links.append(link)
        link.write(agent)
        try:
            async with asyncio.timeout(timeout):
                waits: list[asyncio.Future[Any]] = [self.hello, self.closed]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self.lost(f"the agent did not start within {timeout:g} s")
            raise ChannelClosed(self.closed.result()) from None
        if self.closed.done():  # the hello future is cancelled then
            raise ChannelClosed(self.closed.result())
        return self.hello.result()

    def feed(self, data: bytes) -> None:
        """What the link read from the agent's stdout."""
        if self.closed.done():
            return
        try:
            for kind, ident, payload in self._parser.feed(data):
                self._dispatch(kind, ident, payload)
        except Exception as exc:  # the sandbox's bytes: whatever they break ends the channel
            if not self.hello.done():  # not the agent speaking: what started it, saying why not
                text = data[:2000].decode(errors="replace").strip()
                self.lost(f"the agent did not start; its output: {text}")
            else:
                self.lost(f"the agent broke the channel's framing ({exc})")

    @property
    def starting(self) -> bool:
        """Whether the agent is being started: it has not said hello, and the channel is open."""
        return not self.hello.done() and not self.closed.done()

    @property
    def link(self) -> Link | None:
        """Where frames go: the link the agent was started on, or the one attached since."""
        return self._link

    def attach(self, link: Link) -> None:
        """A second link of the same agent, which frames go to and come from from now on: a
        socket the agent connected to (its stdin and stdout then only start it, and tell it by
        ending that the daemon is gone). Only while it starts (see `starting`), and once."""
        assert self.starting and len(self._links) == 1
        self._link = link
        self._links.append(link)

    def complain(self, data: bytes) -> None:
        """What the agent wrote to its stderr (a traceback, say): logged, up to a bound."""
        if self._complaints >= COMPLAINTS_CAP:
            return
        self._complaints += len(data)
        text = data.decode(errors="replace").rstrip()
        if self._complaints >= COMPLAINTS_CAP:
            text += "\n(the rest of what this agent writes to stderr is not logged)"
        log.warning("%s: agent: %s", self.name, text)

    def lost(self, why: str) -> None:
        """The link ended (or must): everything waiting on the agent is told."""
        if self.closed.done():
            return
        log.debug("%s: channel closed: %s", self.name, why)
        self.closed.set_result(why)
        if not self.hello.done():
            self.hello.cancel()
        for link in self._links:
            link.close()
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(ChannelClosed(why))
        for port in list(self._ports.values()):
            port._end(Exit(None, why))
        self._ports.clear()
        runs, self._runs = self._runs, {}
        for run in runs.values():
            if not run.done.done():
                run.done.set_exception(ChannelClosed(why))

    def _dispatch(self, kind: int, ident: int, payload: bytes | memoryview) -> None:
        if kind == wire.KERNEL:
            channel, parts = wire.split_kernel(payload)
            port = self._ports.get(ident)
            if port is None:
                return
            port._put(channel, parts, len(payload))
            self._queued += len(payload)
            if self._queued > HIGH_WATER and not self._paused and self._link is not None:
                self._paused = True
                self._pauses += 1
                self._link.pause_reading()
            return
        if kind not in (wire.REPLY, wire.EVENT):
            raise wire.FrameError(f"a frame of type {kind} from the agent")
        obj, blob = wire.split_json(payload)
        if not isinstance(obj, dict):
            raise wire.FrameError("a reply or event that is not a JSON object")
        if kind == wire.REPLY:
            future = self._calls.pop(ident, None)
            if future is not None and not future.done():
                future.set_result((obj, blob))
        else:
            self._event(obj, blob)

    def _event(self, event: dict[str, Any], blob: bytes) -> None:
        what = event.get("event")
        if what == "hello" and not self.hello.done():
            self.hello.set_result(event)
        elif what == "output" and (run := self._runs.get(_int(event.get("run")))) is not None:
            run.add(str(event.get("stream")), blob)
        elif what == "exit" and "kernel" in event:
            port = self._ports.pop(_int(event.get("kernel")), None)
            if port is not None:
                code = event.get("code")
                port._end(Exit(code if isinstance(code, int) else None, str(event.get("output", ""))))
        elif what == "tool":
            call, port = _int(event.get("call")), self._ports.get(_int(event.get("kernel")))
            if port is not None and port.on_tool is not None and call not in self._tool_calls:
                self._tool_calls[call] = port
                port.on_tool(call, blob)
            elif call not in self._tool_calls:  # no kernel to serve it: the call is not left waiting
                refused = mcptools.answer("failed", "no kernel serves this call")
                self._refusals.add(task := asyncio.ensure_future(self._answer_tool(call, refused)))
                task.add_done_callback(self._refusals.discard)
        elif what == "tool.cancel" and (port := self._tool_calls.pop(_int(event.get("call")), None)):
            if port.on_tool_cancel is not None:
                port.on_tool_cancel(_int(event.get("call")))
        elif what == "exit" and "run" in event:
            run = self._runs.pop(_int(event.get("run")), None)
            if run is not None and not run.done.done():
                code = event.get("code")
                run.done.set_result(code if isinstance(code, int) else -1)

    async def _answer_tool(self, call: int, reply: bytes) -> None:
        self._tool_calls.pop(call, None)
        with contextlib.suppress(ChannelClosed, AgentError):
            await self.call("tool.reply", reply, call=call)

    def _taken(self, size: int) -> None:
        self._queued -= size
        if self._paused and self._queued < HIGH_WATER // 2 and self._link is not None:
            self._paused = False
            self._link.resume_reading()

    # -- the daemon's side ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._link is not None and not self.closed.done():
            self._link.write(data)

    async def call(self, op: str, blob: bytes = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        """Runs an operation in the agent: its result and blob, or AgentError, ChannelClosed. An
        agent that does not answer within CALL_TIMEOUT is taken for gone, unless the daemon
        itself stopped reading it meanwhile (kernels' messages not taken, see HIGH_WATER)."""
        if self.closed.done():
            raise ChannelClosed(self.closed.result())
        ident = next(self._ids)
        future = self._calls[ident] = asyncio.get_running_loop().create_future()
        self._send(wire.json_frame(wire.CALL, ident, {"op": op, **args}, blob))
        try:
            while True:
                pauses = self._pauses
                try:
                    async with asyncio.timeout(CALL_TIMEOUT):
                        result, data = await asyncio.shield(future)
                    break
                except TimeoutError:
                    if not self._paused and self._pauses == pauses:
                        self.lost(f"the agent did not answer {op} within {CALL_TIMEOUT:g} s")
                        raise ChannelClosed(self.closed.result()) from None
        finally:
            self._calls.pop(ident, None)
        if not result.get("ok"):
            raise AgentError(str(result.get("kind")), str(result.get("message")), str(result.get("path", "")))
        return result, data

    async def start_kernel(
        self, argv: list[str], key: str, env: dict[str, str], name: str
    ) -> tuple[KernelPort, int]:
        """Starts a kernel process; its port and PID. `argv` may hold `{connection_file}` and
        `{credits}`, which the agent replaces with the paths of the files it makes; `name` is
        what the agent names the kernel's images after."""
        slot = next(self._slots)
        port = self._ports[slot] = KernelPort(self, slot)
        try:
            result, _ = await self.call("kernel.start", slot=slot, argv=argv, key=key, env=env, name=name)
        except BaseException:
            port.close()
            raise
        return port, _int(result.get("pid"))

    async def run(
        self, argv: list[str], env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None
    ) -> RunResult:
        """Runs a command in the sandbox and waits for it; each output line goes to `on_line`.
        Cancelling kills the command."""
        ident = next(self._ids)
        run = self._runs[ident] = _Run(on_line)
        try:
            await self.call("run", id=ident, argv=argv, env=env or {})
            code = await asyncio.shield(run.done)
        except asyncio.CancelledError:
            with contextlib.suppress(ChannelClosed, AgentError):
                await self.call("run.signal", id=ident, signum=int(signal.SIGKILL))
            raise
        finally:
            self._runs.pop(ident, None)
        return RunResult(code, run.text("stdout"), run.text("stderr"))

    def close(self) -> None:
        """Ends the channel; the agent, seeing its stdin end, stops every kernel and command."""
        self.lost("the daemon closed the channel")


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
