"""The agent: cellbox's one process inside a sandbox, at the other end of the daemon's channel.

The daemon starts it with the sandbox's interpreter (`python -I -c BOOT N`, through the
engine's exec API, or as a child process) and sends its code down its stdin, so that nothing
of cellbox has to be in the image and the agent is always the daemon's own version. From then
on stdin and stdout carry frames (wire.py) and stderr the agent's own complaints. It acts with
the sandbox's rights only: it starts and signals kernels, moves their zmq messages to and from
the channel (saving their output images in the workspace and cutting messages too big for the
daemon, outputs.py), hands them output credits, runs commands (installs, skill lookups) and
reads and writes the workspace (files.py). Whatever the sandbox's code does to the agent, the
daemon treats what comes out of the channel as untrusted.

Where the daemon offers one, the channel is instead a unix socket it listens on (in a folder of
its own, mounted read-only here), which the agent connects to with the token it was given; stdin
then only tells the agent, by ending, that the daemon is gone.

One thread, one zmq poller over everything: the channel, each kernel's sockets and output pipe,
each command's pipes, and a pipe woken by SIGCHLD. While more than HIGH_WATER bytes wait to go
out, kernel sockets and command pipes are not read, so a flood waits in the sandbox.

Kernels bind IPC sockets in a private folder of the agent's; each has a credits FIFO there,
which its streams read before they print another MiB (see the daemon's kernels.py), and a unix
socket the agent listens on for its calls of MCP tools (CELLBOX_TOOLS, see the daemon's
mcptools/runtime.py): one connection a call, passed to the daemon as a `tool` event and
answered by its `tool.reply`; a connection that closes first is a `tool.cancel`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket as unix
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from cellboxd.sandbox import files, outputs, wire

HIGH_WATER = 4 << 20  # bytes waiting for the channel before kernels and commands are not read
TAIL = 16 << 10  # bytes of a kernel's own output kept for the daemon's error messages
_BATCH = 64  # messages taken from one socket per turn, so that one kernel cannot starve others
_IOV = 64  # pieces written in one writev
_READ = 1 << 20
_PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4}
TOOL_REQUEST = 3 << 20  # bytes of one tool call's request: the daemon takes events of 4 MiB
_TOOL_HEADER = struct.Struct(">I")
_TOOL_SEND_TIMEOUT = 30.0  # seconds a kernel gets to take a tool's answer
TOOL_CONNECTIONS = 64  # connections of one kernel's tool calls open at once; more wait to be taken

try:  # kernels die with the agent, even a killed one
    import ctypes

    _libc: Any = ctypes.CDLL(None, use_errno=True)
except (ImportError, OSError):  # pragma: no cover - a Python without ctypes
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class _Child:
    """A process the agent started: a kernel or a command."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.code: int | None = None
        self.pipes: set[int] = set()  # its output pipes still open

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signum)


class _Kernel(_Child):
    def __init__(
        self, proc: subprocess.Popen[bytes], base: str, sockets: dict[int, Any], credits: int, name: str
    ) -> None:
        super().__init__(proc)
        self.base = base
        self.name = name  # what its images are named after
        self.sockets = sockets  # channel number -> zmq socket
        self.credits = credits
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_size = 0
        self.tools: unix.socket | None = None  # where its calls of MCP tools come in
        self.connections = 0  # of its tool calls, open
        self.accepting = False  # its tool socket is watched

    def keep(self, data: bytes) -> None:
        self.tail.append(data)
        self.tail_size += len(data)
        while self.tail_size > TAIL and len(self.tail) > 1:
            self.tail_size -= len(self.tail.popleft())

    def output(self) -> str:
        return b"".join(self.tail)[-TAIL:].decode(errors="replace")


class _ToolCall:
    """One call of an MCP tool from a kernel: its connection, and the request read so far."""

    def __init__(self, conn: unix.socket, slot: int) -> None:
        self.conn = conn
        self.slot = slot
        self.data = b""
        self.sent = False  # passed on to the daemon


class _Answer:
    """A tool call's answer being written to its kernel, which has until `deadline` to take it."""

    def __init__(self, conn: unix.socket, data: bytes, deadline: float) -> None:
        self.conn = conn
        self.data = memoryview(data)
        self.deadline = deadline


class Agent:
    """Serves the channel on the file descriptors `rx` (read) and `tx` (written): stdin and
    stdout, or both a socket's."""

    def __init__(self, workspace: files.Workspace, folder: str | None, rx: int = 0, tx: int = 1) -> None:
        self.workspace = workspace
        self.images = outputs.Images(workspace)
        self.rx, self.tx = rx, tx
        self.context = zmq.Context()
        self.poller = zmq.Poller()
        self.parser = wire.Parser()
        self.out: collections.deque[bytes | memoryview] = collections.deque()
        self.out_size = 0
        self.writing = False  # polling stdout for room
        self.paused = False
        self.kernels: dict[int, _Kernel] = {}
        self.runs: dict[int, _Child] = {}
        self.tool_calls: dict[int, _ToolCall] = {}
        self.tool_ids = itertools.count(1)
        self.answers: dict[int, _Answer] = {}  # fd -> an answer not yet taken whole
        self.readers: dict[int, Callable[[], None]] = {}  # fd -> what to do when it is readable
        self.sockets: dict[Any, tuple[int, int]] = {}  # zmq socket -> (slot, channel)
        self.own_folder = folder is None  # made here, and removed at the end
        self.folder = folder or tempfile.mkdtemp(prefix="cellbox-agent-")
        self.done = False
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._stop)
        for fd in {0, rx, tx}:
            os.set_blocking(fd, False)
        try:  # a bigger pipe: fewer wake-ups when output floods
            import fcntl

            fcntl.fcntl(tx, 1031, 1 << 20)  # F_SETPIPE_SZ
        except (ImportError, OSError):
            pass
        self.poller.register(rx, zmq.POLLIN)
        if rx != 0:  # stdin still says, by ending, that the daemon is gone
            self.poller.register(0, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.calls: dict[str, Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]] = {
            "kernel.start": self.start_kernel,
            "kernel.signal": self.signal_kernel,
            "kernel.output": self.kernel_output,
            "run": self.start_run,
            "run.signal": self.signal_run,
            "file.write": self.write_file,
            "file.read": self.read_file,
            "file.list": self.list_files,
            "file.delete": self.delete_file,
            "tool.reply": self.tool_reply,
        }

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        self.event({"event": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
        try:
            while not self.done:
                self.flush()
                for item, _ in self.poller.poll(1000 if self.answers else None):
                    if item in self.answers:
                        self._write_answer(item)
                    elif item == self.rx:
                        self.read_channel()
                    elif item == 0:
                        self.watch_stdin()
                    elif item == self.tx:
                        self.flush()
                    elif item == self.wake_r:
                        self.reap()
                    elif isinstance(item, int):
                        # an earlier handler of this turn may have closed it (a tool call's end)
                        if (readable := self.readers.get(item)) is not None:
                            readable()
                    else:
                        self.read_socket(item)
                self._expire_answers()
        finally:
            self.close()

    def _stop(self, *_: Any) -> None:
        self.done = True

    def watch_stdin(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if not os.read(0, _READ):
                self.done = True

    def read_channel(self) -> None:
        try:
            data = os.read(self.rx, _READ)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        if not data:
            self.done = True
            return
        for kind, ident, payload in self.parser.feed(data):
            if kind == wire.KERNEL:
                channel, parts = wire.split_kernel(payload)
                kernel = self.kernels.get(ident)
                if kernel is not None and kernel.code is None and channel in kernel.sockets:
                    kernel.sockets[channel].send_multipart(parts)
            elif kind == wire.CREDIT:
                self.credit(ident, wire.split_count(payload))
            elif kind == wire.CALL:
                args, blob = wire.split_json(payload)
                self.call(ident, args, blob)

    def call(self, ident: int, args: dict[str, Any], blob: bytes) -> None:
        handler = self.calls.get(args.get("op", ""))
        try:
            if handler is None:
                raise files.FileError("invalid", f"unknown operation {args.get('op')!r}", "")
            result, data = handler(args, blob)
            reply: dict[str, Any] = {"ok": True, **result}
        except files.FileError as exc:
            reply, data = {"ok": False, "kind": exc.kind, "message": exc.message, "path": exc.path}, b""
        except Exception as exc:
            reply, data = {"ok": False, "kind": "failed", "message": f"{type(exc).__name__}: {exc}"}, b""
        self.send(wire.json_frame(wire.REPLY, ident, reply, data))

    def event(self, obj: dict[str, Any], blob: bytes = b"") -> None:
        self.send(wire.json_frame(wire.EVENT, 0, obj, blob))

    def send(self, *pieces: bytes | memoryview) -> None:
        """Queues what goes out; the pieces of a frame go out one after the other, not joined."""
        for piece in pieces:
            self.out.append(piece)
            self.out_size += len(piece)
        if self.out_size > HIGH_WATER and not self.paused:
            self.paused = True
            for item in [*self.sockets, *self.readers]:
                self.poller.unregister(item)

    def flush(self) -> None:
        while self.out:
            try:
                written = os.writev(self.tx, list(itertools.islice(self.out, _IOV)))
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionError):
                self.done = True
                self.out.clear()
                return
            self.out_size -= written
            while written:
                head = self.out[0]
                if written >= len(head):
                    written -= len(head)
                    self.out.popleft()
                else:
                    self.out[0] = memoryview(head)[written:]
                    written = 0
        if self.out and not self.writing:
            self.writing = True
            self.poller.register(self.tx, zmq.POLLOUT if self.tx != self.rx else zmq.POLLIN | zmq.POLLOUT)
        elif not self.out and self.writing:
            self.writing = False
            if self.tx != self.rx:
                self.poller.unregister(self.tx)
            else:
                self.poller.register(self.rx, zmq.POLLIN)
        if self.paused and self.out_size < HIGH_WATER // 2:
            self.paused = False
            for item in [*self.sockets, *self.readers]:
                self.poller.register(item, zmq.POLLIN)

    # -- kernels ----------------------------------------------------------------------------

    def start_kernel(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        slot = int(args["slot"])
        if slot in self.kernels:
            raise files.FileError("invalid", f"kernel slot {slot} is taken", "")
        base = os.path.join(self.folder, f"k{slot}")
        connection = {
            "transport": "ipc",
            "ip": base,
            **{f"{name}_port": port for name, port in _PORTS.items()},
            "hb_port": 5,
            "key": args["key"],
            "signature_scheme": "hmac-sha256",
            "kernel_name": "",
        }
        tools_path = base + ".tools"
        tools = unix.socket(unix.AF_UNIX, unix.SOCK_STREAM)
        try:
            tools.bind(tools_path)
        except OSError:
            tools.close()
            raise
        tools.listen(64)
        tools.setblocking(False)
        connection_file = base + ".json"
        fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(connection, file)
        credits = base + ".credits"
        os.mkfifo(credits, 0o600)
        credits_fd = os.open(credits, os.O_RDWR | os.O_NONBLOCK)
        argv = [
            a.replace("{connection_file}", connection_file).replace("{credits}", credits)
            for a in args["argv"]
        ]
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                cwd=args.get("cwd") or self.workspace.root,
                env={**os.environ, **args.get("env", {}), "CELLBOX_TOOLS": tools_path},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            os.close(read_end)
            os.close(credits_fd)
            tools.close()
            for path in (connection_file, credits, tools_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise files.FileError("failed", f"cannot start the kernel: {exc}", "") from None
        finally:
            os.close(write_end)
        sockets = {}
        for name, port in _PORTS.items():
            if name == "stdin":
                continue
            socket = self.context.socket(zmq.SUB if name == "iopub" else zmq.DEALER)
            socket.linger = 0
            if name == "iopub":
                # PUB drops what a full queue does not take: here it queues while the agent waits
                # for the channel (the kernel's streams wait for their credits)
                socket.rcvhwm = 0
                socket.subscribe(b"")
            socket.connect(f"ipc://{base}-{port}")
            sockets[wire.CHANNEL[name]] = socket
            self.sockets[socket] = (slot, wire.CHANNEL[name])
            if not self.paused:
                self.poller.register(socket, zmq.POLLIN)
        name = str(args.get("name") or f"k{slot}")
        kernel = self.kernels[slot] = _Kernel(proc, base, sockets, credits_fd, name)
        kernel.tools = tools
        self._accept_tools(slot, kernel, True)
        self._watch_pipe(kernel, read_end, kernel.keep)
        return {"pid": proc.pid}, b""

    def signal_kernel(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        kernel = self.kernels.get(int(args["slot"]))
        if kernel is not None and kernel.code is None:
            kernel.signal(int(args["signum"]))
        return {}, b""

    def kernel_output(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        kernel = self.kernels.get(int(args["slot"]))
        return {"output": kernel.output() if kernel is not None else ""}, b""

    def read_socket(self, socket: Any) -> None:
        slot, channel = self.sockets[socket]
        kernel = self.kernels[slot]
        for _ in range(_BATCH):
            try:
                parts = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.forward(slot, kernel, channel, parts)
            if self.paused:
                return

    def forward(self, slot: int, kernel: _Kernel, channel: int, parts: list[bytes]) -> None:
        """Passes one of a kernel's messages on (see outputs.py)."""
        try:
            messages = outputs.pass_on(parts, kernel.name, self.images)
        except Exception as exc:  # content nested to the recursion limit, say: the message is lost
            sys.stderr.write(f"kernel {kernel.name}: a message not passed on: {type(exc).__name__}\n")
            messages = [parts] if outputs.size(parts) <= outputs.MESSAGE_BOUND else []
        for message in messages:
            self.send(*wire.kernel_pieces(slot, channel, message))

    def credit(self, slot: int, count: int) -> None:
        kernel = self.kernels.get(slot)
        if kernel is not None and kernel.code is None:
            with contextlib.suppress(OSError):  # full: it has credits enough
                os.write(kernel.credits, b"\0" * min(count, 1 << 16))

    def _end_kernel(self, slot: int, kernel: _Kernel) -> None:
        """Sends what the kernel's sockets still hold, then its exit, and forgets it."""
        for channel, socket in kernel.sockets.items():
            while True:
                try:
                    parts = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.forward(slot, kernel, channel, parts)
            if socket in self.sockets:
                del self.sockets[socket]
                if not self.paused:
                    self.poller.unregister(socket)
            socket.close(0)
        os.close(kernel.credits)
        for ident in [i for i, c in self.tool_calls.items() if c.slot == slot]:
            self._drop_tool(ident)
        if kernel.tools is not None:
            self._accept_tools(slot, kernel, False)
            kernel.tools.close()
        for path in (
            kernel.base + ".json",
            kernel.base + ".credits",
            kernel.base + ".tools",
            *(f"{kernel.base}-{p}" for p in range(1, 6)),
        ):
            with contextlib.suppress(OSError):
                os.unlink(path)
        del self.kernels[slot]
        self.event({"event": "exit", "kernel": slot, "code": kernel.code, "output": kernel.output()})

    # -- calls of MCP tools -----------------------------------------------------------------

    def _accept_tools(self, slot: int, kernel: _Kernel, on: bool) -> None:
        """Watches a kernel's tool socket, or stops: at TOOL_CONNECTIONS open connections, or
        when the agent has no descriptor left, further calls wait in the socket's backlog."""
        assert kernel.tools is not None
        if on and not kernel.accepting:
            self._watch(kernel.tools.fileno(), lambda: self._accept_tool(slot, kernel))
        elif not on and kernel.accepting:
            self._unwatch(kernel.tools.fileno())
        kernel.accepting = on

    def _accept_tool(self, slot: int, kernel: _Kernel) -> None:
        assert kernel.tools is not None
        try:
            conn, _ = kernel.tools.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # no descriptor left: taken again as a call ends
            self._accept_tools(slot, kernel, False)
            return
        conn.setblocking(False)
        ident = next(self.tool_ids)
        self.tool_calls[ident] = _ToolCall(conn, slot)
        kernel.connections += 1
        if kernel.connections >= TOOL_CONNECTIONS:
            self._accept_tools(slot, kernel, False)
        self._watch(conn.fileno(), lambda: self._read_tool(ident))

    def _read_tool(self, ident: int) -> None:
        call = self.tool_calls.get(ident)
        if call is None:
            return
        try:
            data = call.conn.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the kernel gave up (an interrupt, its end): so does the daemon
            self._drop_tool(ident)
            if call.sent:
                self.event({"event": "tool.cancel", "call": ident})
            return
        if call.sent:
            return
        call.data += data
        if len(call.data) < _TOOL_HEADER.size:
            return
        (size,) = _TOOL_HEADER.unpack_from(call.data)
        if size > TOOL_REQUEST:
            message = f"the call's arguments take more than {TOOL_REQUEST >> 20} MiB"
            self._answer_tool(ident, json.dumps({"ok": False, "kind": "failed", "message": message}).encode())
        elif len(call.data) >= _TOOL_HEADER.size + size:
            call.sent = True
            request, call.data = call.data[_TOOL_HEADER.size : _TOOL_HEADER.size + size], b""
            self.event({"event": "tool", "kernel": call.slot, "call": ident}, request)

    def tool_reply(self, args: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        self._answer_tool(int(args["call"]), blob)
        return {}, b""

    def _answer_tool(self, ident: int, reply: bytes) -> None:
        """Writes a call's answer, as the kernel takes it, and then closes its connection; a
        kernel that does not take it within _TOOL_SEND_TIMEOUT loses it."""
        call = self.tool_calls.get(ident)
        if call is None:  # cancelled meanwhile
            return
        self._drop_tool(ident, close=False)
        fd = call.conn.fileno()
        deadline = time.monotonic() + _TOOL_SEND_TIMEOUT
        self.answers[fd] = _Answer(call.conn, _TOOL_HEADER.pack(len(reply)) + reply, deadline)
        self.poller.register(fd, zmq.POLLOUT)
        self._write_answer(fd)

    def _write_answer(self, fd: int) -> None:
        answer = self.answers[fd]
        try:
            while answer.data:
                answer.data = answer.data[answer.conn.send(answer.data) :]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_answer(fd)

    def _end_answer(self, fd: int) -> None:
        answer = self.answers.pop(fd)
        self.poller.unregister(fd)
        answer.conn.close()

    def _expire_answers(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, answer in self.answers.items() if answer.deadline < now]:
            self._end_answer(fd)

    def _drop_tool(self, ident: int, close: bool = True) -> None:
        call = self.tool_calls.pop(ident, None)
        if call is None:
            return
        self._unwatch(call.conn.fileno())
        if close:
            call.conn.close()
        kernel = self.kernels.get(call.slot)
        if kernel is not None:
            kernel.connections -= 1
            if kernel.code is None and kernel.tools is not None and kernel.connections < TOOL_CONNECTIONS:
                self._accept_tools(call.slot, kernel, True)

    def _watch(self, fd: int, readable: Callable[[], None]) -> None:
        self.readers[fd] = readable
        if not self.paused:
            self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None and not self.paused:
            self.poller.unregister(fd)

    # -- commands ---------------------------------------------------------------------------

    def start_run(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ident = int(args["id"])
        try:
            proc = subprocess.Popen(
                args["argv"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=args.get("cwd") or self.workspace.root,
                env={**os.environ, **args.get("env", {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise files.FileError("failed", f"cannot run {args['argv'][0]!r}: {exc}", "") from None
        run = self.runs[ident] = _Child(proc)
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            assert pipe is not None
            fd = os.dup(pipe.fileno())
            pipe.close()
            self._watch_pipe(run, fd, self._run_output(ident, stream))
        return {"pid": proc.pid}, b""

    def _run_output(self, ident: int, stream: str) -> Callable[[bytes], None]:
        def send(data: bytes) -> None:
            self.event({"event": "output", "run": ident, "stream": stream}, data)

        return send

    def signal_run(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        run = self.runs.get(int(args["id"]))
        if run is not None and run.code is None:
            run.signal(int(args["signum"]))
        return {}, b""

    def _watch_pipe(self, child: _Child, fd: int, sink: Callable[[bytes], None]) -> None:
        os.set_blocking(fd, False)
        child.pipes.add(fd)

        def readable() -> None:
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                sink(data)
                return
            self._unwatch(fd)
            os.close(fd)
            child.pipes.discard(fd)
            self._maybe_ended(child)

        self._watch(fd, readable)

    # -- ends -------------------------------------------------------------------------------

    def reap(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        for child in [*self.kernels.values(), *self.runs.values()]:
            if child.code is not None:
                continue
            try:
                pid, status = os.waitpid(child.proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.proc.pid, 255 << 8
            if pid:
                child.code = _exit_code(status)
                child.proc.returncode = child.code
                self._maybe_ended(child)

    def _maybe_ended(self, child: _Child) -> None:
        """A kernel ends when its process does; a command when its pipes have closed too."""
        if child.code is None:
            return
        if isinstance(child, _Kernel):
            slot = next((s for s, k in self.kernels.items() if k is child), None)
            if slot is not None:
                self._end_kernel(slot, child)
            return
        if child.pipes:
            return
        ident = next((i for i, r in self.runs.items() if r is child), None)
        if ident is not None:
            del self.runs[ident]
            self.event({"event": "exit", "run": ident, "code": child.code})

    def close(self) -> None:
        for child in [*self.kernels.values(), *self.runs.values()]:
            child.signal(signal.SIGKILL)
        self.context.destroy(0)
        if self.own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- files ------------------------------------------------------------------------------

    def write_file(self, args: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        size = self.workspace.write(args["path"], blob, bool(args.get("append")), args.get("mode"))
        return {"size": size}, b""

    def read_file(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        content, size = self.workspace.read(args["path"], int(args.get("offset", 0)), int(args["length"]))
        return {"size": size}, content

    def list_files(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        entries, truncated = self.workspace.list(
            args.get("path", "."), bool(args.get("recursive")), int(args["limit"])
        )
        return {"entries": entries, "truncated": truncated}, b""

    def delete_file(self, args: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        self.workspace.delete(args["path"], bool(args.get("recursive")))
        return {}, b""


def main(workspace: str, folder: str | None = None, socket: str | None = None, token: str = "") -> None:
    """Serves the channel until stdin ends; run by the bootstrap. Kernels' sockets go in
    `folder`, else in a temporary folder of the agent's own. With `socket`, the channel is that
    unix socket, connected with `token`, where it can be reached; else stdin and stdout."""
    os.makedirs(workspace, exist_ok=True)
    os.chdir(workspace)
    import socket as _socket

    connection = None
    if socket:
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            connection.settimeout(5)
            connection.connect(socket)
            connection.sendall(token.encode() + b"\n")
            connection.settimeout(60)  # the daemon answers or closes it; past its own hello timeout
            if connection.recv(1) != b"\n":  # the daemon did not take it
                raise ConnectionError
        except OSError:  # not here (another machine, gVisor, a VM): stdin and stdout it is
            connection.close()
            connection = None
    rx, tx = (connection.fileno(),) * 2 if connection is not None else (0, 1)
    Agent(files.Workspace(workspace), folder, rx, tx).serve()
