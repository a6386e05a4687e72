"""A kernel: one IPython kernel process in a sandbox, and the routing of its messages.

The process is started by the sandbox's agent and reached through a `KernelPort` of the
sandbox's channel, whatever the backend. This module owns its lifecycle (start and the
handshake that tells it is ready, interrupt, restart, shutdown, death) and hands its messages
to the running execution and to editor requests. jupyter_client's `Session` signs and
serializes what the daemon sends; `messages.decode` reads what comes back. Executes on one
kernel run in arrival order (a FIFO lock); kernels run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cellbox import errors, methods
from cellbox import types as t
from cellboxd import mcptools
from cellboxd.channel import AgentError, ChannelClosed, Exit, KernelPort
from cellboxd.execution import Execution, Notify
from cellboxd.messages import Message, decode
from cellboxd.sandbox.wire import CHANNEL

if TYPE_CHECKING:
    from jupyter_client.session import Session

    from cellboxd.backends.base import SandboxRuntime

log = logging.getLogger(__name__)

ToolCalls = Callable[["Kernel", Execution | None, bytes], Awaitable[bytes]]
"""Serves a kernel's call of an MCP tool (the request's JSON): the answer's JSON."""

_CHUNK = 1 << 20  # characters of output per notification, at the most
_SHELL, _IOPUB, _CONTROL = CHANNEL["shell"], CHANNEL["iopub"], CHANNEL["control"]
_STOP_WAIT = 5.0  # seconds for a process to end once it was killed
_SHUTDOWN_WAIT = 2.0  # seconds a kernel gets to end after a shutdown_request
TOOL_CALLS = 32  # calls of MCP tools one kernel has under way at once; more are refused
UNDRAINED = 64 << 10  # bytes of a kernel's messages sent on before its client is waited for

# Run in each kernel at start. ipykernel sends what a cell prints every 0.2 s however much it
# is, so a cell that prints fast makes messages of many MB; and nothing stops a kernel from
# printing faster than the daemon's client reads. So every MiB a kernel writes is handed to
# ipykernel's IO thread as one message, and needs a credit: a byte the agent writes into the
# kernel's credits FIFO when the daemon's client has taken a MiB (see `_credit`). A kernel may
# be CREDITS_AHEAD MiB ahead; then `print` waits for its reader, as on a terminal. The credits
# are the bound, so a MiB's message is not waited for (a cell printing 1 KiB lines ran 20%
# slower in a container when each MiB waited for the IO thread). A FIFO that cannot be opened,
# or that ends (the agent is gone), stops the waiting. ipykernel flushes both streams before and
# after every execute, each time waiting for its IO thread even with nothing to send; here a
# flush returns at once when nothing is buffered and no run of the IO thread's `_flush` is under
# way (1.6 ms less per execute on a 2-core machine). What such a run took from the buffers is
# queued for sending only at its end, so a flush that did not wait for it let the execute's idle
# status overtake the last MiB. The wrappers are put back before every cell: IPython 9 restores
# `sys.stdout.write` after each one.
CREDIT_CHARS = 1 << 20
CREDITS_AHEAD = 8
_BOUNDED_STREAMS = """\
def _cellbox_bound(path, limit={limit}, ahead={ahead}):
    import os as _o, sys as _s
    fifo, credits, since = None, ahead, 0  # the FIFO, credits in hand, characters since the last
    if path:
        try:
            fifo = _o.open(path, _o.O_RDONLY | _o.O_NONBLOCK)
            _o.set_blocking(fifo, True)
        except OSError:
            pass
    def credit():
        nonlocal fifo, credits
        if credits:
            credits -= 1
        elif fifo is not None and not _o.read(fifo, 1):
            _o.close(fifo)
            fifo = None
    def bound(stream):
        write = stream.write
        if getattr(write, "_cellbox", False):
            return
        flush = getattr(stream.flush, "_cellbox", stream.flush)  # ipykernel's own
        pub = getattr(stream, "pub_thread", None)  # ipykernel's: hand over, don't wait
        hand_over = (lambda: pub.schedule(stream._flush)) if pub is not None else flush
        def bounded(text):
            nonlocal since
            size = len(text)
            if since + size < limit:  # the common case: one comparison more than a plain write
                since += size
                write(text)
                return size
            for start in range(0, max(size, 1), limit):
                piece = text[start : start + limit]
                write(piece)
                since += len(piece)
                while since >= limit:
                    since -= limit
                    hand_over()
                    credit()
            return size
        counted = getattr(stream, "_flush", None)  # ipykernel's, run on its IO thread
        if counted is not None and not hasattr(counted, "_cellbox"):
            send, sending = counted, [0]  # runs under way: what they took is not queued yet
            def counted():
                sending[0] += 1
                try:
                    send()
                finally:
                    sending[0] -= 1
            counted._cellbox, counted.sending = send, sending
            stream._flush = counted
        sending = getattr(counted, "sending", [0])
        def quick_flush():
            try:  # the buffers first: then a run that takes from them after the look is counted
                idle = not any(b.tell() for b in [*stream._buffers.values()]) and not sending[0]
            except Exception:  # another ipykernel, or a buffer its IO thread has just closed
                idle = False
            if not idle:
                flush()
        bounded._cellbox, quick_flush._cellbox = True, flush
        stream.write, stream.flush = bounded, quick_flush
    def bound_both(*_):
        bound(_s.stdout)
        bound(_s.stderr)
    bound_both()
    get_ipython().events.register("pre_execute", bound_both)
_cellbox_bound({path!r})
del _cellbox_bound
try:  # IOPub's PUB socket drops what its reader is slow to take: let it queue instead
    import zmq as _z
    _t = get_ipython().kernel.iopub_thread  # the socket is its thread's to touch
    _t.schedule(lambda t=_t, z=_z: t.socket.setsockopt(z.SNDHWM, 0))
    del _t, _z
except Exception:
    pass"""


def kernel_argv(python: str) -> list[str]:
    """How the agent starts an IPython kernel with `python`; it fills in the placeholders.

    Completion uses IPython's own completer, which completes the live objects of the kernel's
    namespace (what an editor bound to it wants); jedi's static analysis is slow to start and
    returns nothing with some IPython and jedi versions. Each kernel keeps its history in
    memory: kernels of one sandbox share a profile, and its SQLite file, under load, makes
    IPython print "database is locked" into a cell's output.
    """
    return [
        python,
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
        "--IPCompleter.use_jedi=False",
        "--HistoryManager.hist_file=:memory:",
        "--IPKernelApp.exec_lines="
        + _BOUNDED_STREAMS.format(limit=CREDIT_CHARS, ahead=CREDITS_AHEAD, path="{credits}"),
    ]


class _Process:
    """One launch of the kernel: its port, its key's session, and the tasks reading it."""

    def __init__(self, port: KernelPort, session: Session, pid: int) -> None:
        self.port = port
        self.session = session
        self.pid = pid
        self.tasks: list[asyncio.Task[None]] = []


class Kernel:
    def __init__(
        self,
        *,
        kernel_id: str,
        sandbox_id: str,
        runtime: SandboxRuntime,
        text_cap: int,
        interrupt_grace: float,
        start_timeout: float,
        notify: Notify,
        drain: Callable[[], Awaitable[None]],
        tools: ToolCalls,
        name: str | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.sandbox_id = sandbox_id
        self.name = name
        self.state: t.KernelState = "starting"
        self._runtime = runtime
        self._text_cap = text_cap
        self._grace = interrupt_grace
        self._start_timeout = start_timeout
        self._notify = notify
        self._drain = drain
        self._process: _Process | None = None
        self._ready = False  # the handshake is done: status messages are the kernel's state
        self._iopub_seen = asyncio.Event()
        self._uncredited = 0  # characters of output taken since the last credit
        self._undrained = 0  # bytes of messages read since the client was last waited for
        self._queue = asyncio.Lock()
        self._lifecycle = asyncio.Lock()  # one restart or shutdown at a time
        self._current: Execution | None = None
        self._current_msg_id: str | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # other shell requests
        self._restarting = False
        self._pending_restart: asyncio.Task[None] | None = None
        self._tools = tools
        # its calls of MCP tools under way -> (their task, the execution they came from)
        self._tool_calls: dict[int, tuple[asyncio.Task[None], Execution | None]] = {}
        self.closed = False
        self.exit: Exit | None = None  # how the last process ended, while the kernel is dead

    # -- lifecycle --------------------------------------------------------------------------

    def adopt(self, notify: Notify, name: str | None) -> None:
        """Hands a kernel from the warm pool to the client: its notifications go out from now on,
        starting with its state."""
        self._notify = notify
        self.name = name
        notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, self.state))

    async def start(self) -> None:
        self._notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, "starting"))
        await self._launch()

    async def _launch(self) -> None:
        """Starts a process, and waits until it answers on shell and publishes on IOPub."""
        from jupyter_client.session import Session  # with the first kernel: a faster start

        key = secrets.token_hex(32)
        try:
            channel = await self._runtime.channel()
            port, pid = await channel.start_kernel(
                kernel_argv(self._runtime.python), key, self._runtime.env(), self.kernel_id
            )
        except ChannelClosed as exc:
            raise self._died(f"the sandbox's agent is gone ({exc})") from None
        except AgentError as exc:
            raise self._died(f"could not be started in the sandbox: {exc.message}") from None
        process = self._process = _Process(port, Session(key=key.encode(), username="cellbox"), pid)
        port.on_tool = functools.partial(self._on_tool, process)
        port.on_tool_cancel = self._on_tool_cancel
        self._ready = False
        self._iopub_seen.clear()
        self._uncredited = 0
        self.exit = None
        process.tasks = [
            asyncio.create_task(self._read(process), name=f"read-{self.kernel_id}"),
            asyncio.create_task(self._monitor(process), name=f"monitor-{self.kernel_id}"),
        ]
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._handshake(process)
        except TimeoutError:
            output = await port.output()
            await self._stop_process(now=True)
            raise self._died(
                f"did not answer within {self._start_timeout:g} s; its output:\n{output}"
            ) from None
        except BaseException:
            await self._stop_process(now=True)
            raise
        self._ready = True
        self._set_state("idle")

    async def _handshake(self, process: _Process) -> None:
        """kernel_info requests until one is answered and IOPub has carried a message (the
        subscription of a new connection takes a moment to reach the kernel)."""
        wait = 0.2
        while True:
            reply = self._request(process, "kernel_info_request", {})
            seen = asyncio.ensure_future(self._iopub_seen.wait())
            try:
                waits: list[asyncio.Future[Any]] = [reply, process.port.exited]
                done, _ = await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if process.port.exited.done():
                    exit = process.port.exited.result()
                    raise self._died(f"ended as it started{_code(exit)}; its output:\n{exit.output}")
                if reply in done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(seen), wait)
                    if self._iopub_seen.is_set():
                        return
            finally:
                seen.cancel()
                reply.cancel()
            wait = min(wait * 2, 1.0)

    def _died(self, why: str) -> errors.KernelDied:
        return errors.KernelDied(f"kernel {self.kernel_id} {why}", {"kernelId": self.kernel_id})

    async def _stop_process(self, now: bool) -> None:
        """Ends the current process (asking it first unless `now`) and its tasks."""
        process, self._process = self._process, None
        if process is None:
            return
        port = process.port
        if not now and not port.exited.done():
            self._send(process, _CONTROL, "shutdown_request", {"restart": False})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(port.exited), _SHUTDOWN_WAIT)
        if not port.exited.done():
            with contextlib.suppress(ChannelClosed, Exception):
                await port.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(port.exited), _STOP_WAIT)
        for task in process.tasks:
            task.cancel()
        for task in process.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        port.close()

    async def shutdown(self, now: bool = False) -> None:
        """Stops the kernel process; an execution still running ends as `died`."""
        if self.closed:
            return
        self.closed = True
        self._end_current()
        if self._pending_restart is not None:
            self._pending_restart.cancel()
        async with self._lifecycle:
            await self._stop_process(now)
        self._set_state("dead")

    async def interrupt(self) -> None:
        self._check_usable()
        if self._current is not None:
            self._end_tool_calls(self._current)
        await self._signal(signal.SIGINT)

    async def _signal(self, signum: int) -> None:
        process = self._process
        if process is not None:
            with contextlib.suppress(ChannelClosed):
                await process.port.signal(signum)

    async def restart(self) -> None:
        """A fresh process with the same kernelId; works on a dead kernel too."""
        self._check_open()
        async with self._lifecycle:
            await self._restart()

    async def _restart(self) -> None:
        self._restarting = True
        try:
            self._set_state("restarting")
            self._end_current()
            await self._stop_process(now=True)
            await self._launch()
        except BaseException:
            self._set_state("dead")
            raise
        finally:
            self._restarting = False

    # -- sending ----------------------------------------------------------------------------

    def _send(self, process: _Process, channel: int, msg_type: str, content: dict[str, Any]) -> str:
        msg = process.session.msg(msg_type, content)
        process.port.send(channel, process.session.serialize(msg))
        return str(msg["header"]["msg_id"])

    def _request(
        self, process: _Process, msg_type: str, content: dict[str, Any]
    ) -> asyncio.Future[dict[str, Any]]:
        """Sends a shell request; its reply's content, when it comes."""
        msg_id = self._send(process, _SHELL, msg_type, content)
        waiter = self._replies[msg_id] = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(lambda _: self._replies.pop(msg_id, None))
        return waiter

    # -- editor requests ---------------------------------------------------------------------

    async def ask(
        self, kind: Literal["complete", "inspect"], code: str, cursor_pos: int, within: float
    ) -> dict[str, Any] | None:
        """A `complete_request` or `inspect_request`'s reply, or None when the kernel cannot
        answer: a kernel that runs an execution would answer only after it, and an editor must
        not wait for that."""
        process = self._process
        if process is None or not self._ready or self.closed or self.state == "dead" or self._queue.locked():
            return None
        content: dict[str, Any] = {"code": code, "cursor_pos": cursor_pos}
        if kind == "inspect":
            content["detail_level"] = 0
        waiter = self._request(process, f"{kind}_request", content)
        try:
            return await asyncio.wait_for(waiter, within)
        except TimeoutError:
            return None

    # -- execution --------------------------------------------------------------------------

    async def execute(self, params: t.ExecuteParams) -> t.ExecuteResult:
        execution_id = params.execution_id or uuid.uuid4().hex
        execution = Execution(
            execution_id=execution_id,
            kernel_id=self.kernel_id,
            workspace=self._runtime.workspace,
            text_cap=self._text_cap,
            notify=self._notify,
        )
        try:
            async with self._queue:
                if self._pending_restart is not None:
                    await asyncio.shield(self._pending_restart)
                    self._pending_restart = None
                self._check_usable()
                return await self._run(execution, params)
        except asyncio.CancelledError:
            raise errors.RequestCancelled(
                "execution cancelled", {"result": _builtins(execution.result("cancelled", execution.error))}
            ) from None

    async def _run(self, execution: Execution, params: t.ExecuteParams) -> t.ExecuteResult:
        process = self._process
        assert process is not None
        content = {
            "code": params.code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        msg_id = self._send(process, _SHELL, "execute_request", content)
        self._current, self._current_msg_id = execution, msg_id
        try:
            try:
                async with asyncio.timeout(params.timeout) as execution.deadline:
                    await asyncio.shield(execution.finished)
            except TimeoutError:
                return await self._stop(execution, "timeout", f"did not finish within {params.timeout:g} s")
            except asyncio.CancelledError:
                result = await asyncio.shield(self._stop(execution, "cancelled", "was cancelled"))
                raise errors.RequestCancelled("execution cancelled", {"result": _builtins(result)}) from None
            if execution.reply_status is None:  # ended without a reply: the kernel went away
                return execution.result("died", self._death_error())
            return execution.result()
        finally:
            self._current = self._current_msg_id = None
            execution.deadline = None
            self._end_tool_calls(execution)

    async def _stop(self, execution: Execution, status: t.ExecuteStatus, what: str) -> t.ExecuteResult:
        """Interrupts a running execution; restarts the kernel if it does not stop in time."""
        self._end_tool_calls(execution)
        if self.exit is None and self.state != "dead":
            with contextlib.suppress(Exception):
                await self._signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(execution.finished), self._grace)
        if execution.finished.done() and execution.reply_status is None:
            return execution.result("died", self._death_error())
        evalue = f"the execution {what}; the kernel was interrupted"
        if not execution.finished.done():
            evalue += (
                f" but did not stop within {self._grace:g} s, so it is being restarted (its state is lost)"
            )
            self._pending_restart = asyncio.create_task(self.restart())
        name = "TimeoutError" if status == "timeout" else "ExecutionCancelled"
        traceback = execution.error.traceback if execution.error else []
        return execution.result(status, t.ErrorInfo(name, evalue, traceback))

    def _death_error(self) -> t.ErrorInfo:
        if self.closed:
            why = "the kernel was shut down"
        elif self._restarting:
            why = "the kernel was restarted"
        elif self.exit is not None and self.exit.code is None:
            why = f"the sandbox's agent went away ({self.exit.output}); restart the kernel to go on"
        else:
            why = f"the kernel process ended{_code(self.exit)}; restart it to go on"
        return t.ErrorInfo("KernelDied", why, [])

    def _end_current(self) -> None:
        if self._current is not None:
            self._current.end()

    def _check_open(self) -> None:
        if self.closed:
            raise errors.KernelNotFound(
                f"kernel {self.kernel_id} was shut down", {"kernelId": self.kernel_id}
            )

    def _check_usable(self) -> None:
        self._check_open()
        if self.state == "dead" or self._process is None:
            why = f"kernel {self.kernel_id} is dead{_code(self.exit)}"
            raise errors.KernelDied(
                f"{why}; restart it with {methods.RESTART_KERNEL}", {"kernelId": self.kernel_id}
            )

    # -- background tasks -------------------------------------------------------------------

    def _set_state(self, state: t.KernelState) -> None:
        if state != self.state:
            self.state = state
            self._notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, state))

    async def _read(self, process: _Process) -> None:
        while (item := await process.port.get()) is not None:
            channel, frames, size = item
            try:
                msg = decode(frames)
                if channel == _IOPUB:
                    await self._on_iopub(process, msg, size)
                elif channel == _SHELL:
                    self._on_shell(msg)
            except Exception as exc:  # the sandbox's code can send anything: one message is lost
                log.warning("kernel %s: ignored a message: %r", self.kernel_id, exc)
            if process.port.waiting():  # a flood: the other kernels and requests get their turn
                await asyncio.sleep(0)

    async def _on_iopub(self, process: _Process, msg: Message, size: int) -> None:
        self._iopub_seen.set()
        content = msg.content
        if msg.msg_type == "status" and self._ready and not self._restarting:
            state = content.get("execution_state")
            if state in ("busy", "idle"):
                self._set_state(state)
        execution = self._current
        if execution is not None and msg.parent_id == self._current_msg_id:
            text = content.get("text")
            if msg.msg_type == "stream" and isinstance(text, str) and len(text) > _CHUNK:
                # a huge output goes out in pieces, each only once the client took the last
                for start in range(0, len(text), _CHUNK):
                    execution.on_iopub(msg.msg_type, {**content, "text": text[start : start + _CHUNK]})
                    await self._drain()
            elif msg.msg_type in ("execute_result", "display_data"):
                execution.on_output(msg.msg_type, content)
            else:
                execution.on_iopub(msg.msg_type, content)
        # a client that reads slowly slows the reading of the kernel's output, and the daemon
        # holds no more than the writer's high-water mark, and UNDRAINED bytes of each kernel's:
        # a kernel that sends little is not held back behind the floods of others
        self._undrained += size
        if self._undrained > UNDRAINED:
            self._undrained = 0
            await self._drain()
        if msg.msg_type == "stream":
            self._credit(process, content.get("text"))

    def _credit(self, process: _Process, text: object) -> None:
        """Lets the kernel print another MiB for each MiB of its output the client has taken."""
        if not isinstance(text, str):
            return
        self._uncredited += len(text)
        if self._uncredited >= CREDIT_CHARS:
            count, self._uncredited = divmod(self._uncredited, CREDIT_CHARS)
            process.port.credit(count)

    # -- calls of MCP tools -----------------------------------------------------------------

    def _on_tool(self, process: _Process, call: int, request: bytes) -> None:
        """A call from a cell: served in a task of its own, which the execution's end, an
        interrupt, or the cell giving up (see channel.py) cancels."""
        execution = self._current
        if len(self._tool_calls) >= TOOL_CALLS:
            busy = mcptools.answer("failed", f"more than {TOOL_CALLS} calls of MCP tools at once")
            served: Coroutine[Any, Any, None] = process.port.answer_tool(call, busy)
        else:
            served = self._tool(process, call, request, execution)
        task = asyncio.create_task(served, name=f"tool-{call}")
        self._tool_calls[call] = (task, execution)
        task.add_done_callback(lambda _: self._tool_calls.pop(call, None))

    async def _tool(self, process: _Process, call: int, request: bytes, execution: Execution | None) -> None:
        try:
            reply = await self._tools(self, execution, request)
        except asyncio.CancelledError:
            reply = mcptools.answer("failed", "the call was ended: its execution was interrupted or is over")
        except Exception as exc:  # the sandbox's request: a line in the log, not a traceback
            log.warning("kernel %s: a tool call failed: %r", self.kernel_id, exc)
            reply = mcptools.answer("failed", f"the daemon failed the call: {type(exc).__name__}")
        await process.port.answer_tool(call, reply)

    def _on_tool_cancel(self, call: int) -> None:
        entry = self._tool_calls.get(call)
        if entry is not None:
            entry[0].cancel()

    def _end_tool_calls(self, execution: Execution) -> None:
        for task, started_by in list(self._tool_calls.values()):
            if started_by is execution:
                task.cancel()

    def _on_shell(self, msg: Message) -> None:
        execution = self._current
        if execution is not None and msg.parent_id == self._current_msg_id:
            execution.on_reply(msg.content)
        elif (waiter := self._replies.get(msg.parent_id or "")) is not None and not waiter.done():
            waiter.set_result(msg.content)

    async def _monitor(self, process: _Process) -> None:
        """Notices a kernel process that is gone, and ends the execution waiting on it once what
        the process sent before it ended has been read."""
        exit = await asyncio.shield(process.port.exited)
        await asyncio.wait(process.tasks[:1])
        if self._restarting or self.closed or process is not self._process or not self._ready:
            return
        self.exit = exit
        log.warning("kernel %s died%s", self.kernel_id, _code(exit))
        self._set_state("dead")
        self._end_current()


def _code(exit: Exit | None) -> str:
    return "" if exit is None or exit.code is None else f" (exit code {exit.code})"


def _builtins(result: t.ExecuteResult) -> Any:
    return msgspec.to_builtins(result)
