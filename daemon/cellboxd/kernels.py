"""A kernel: one IPython kernel driven through jupyter_client's async manager and client.

Each kernel has one IOPub reader and one shell reader that route messages to the running
execution by their parent's msg_id, a monitor that notices a dead kernel process at once
(it sleeps until the process ends), and
a FIFO lock so that executes on one kernel run in arrival order (kernels run in parallel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cellbox import errors, methods
from cellbox import types as t
from cellboxd.backends.base import CREDIT_CHARS, KernelLaunch, process_exit
from cellboxd.execution import Execution, Notify
from cellboxd.messages import Reader

if TYPE_CHECKING:
    from jupyter_client.asynchronous.client import AsyncKernelClient
    from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # characters of output per notification, at the most


class Kernel:
    def __init__(
        self,
        *,
        kernel_id: str,
        sandbox_id: str,
        launch: KernelLaunch,
        images_dir: Path,
        text_cap: int,
        interrupt_grace: float,
        start_timeout: float,
        notify: Notify,
        drain: Callable[[], Awaitable[None]],
        name: str | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.sandbox_id = sandbox_id
        self.name = name
        self.state: t.KernelState = "starting"
        self._km: AsyncKernelManager = launch.manager
        self._launch_kwargs = launch.kwargs
        self._log_path = launch.log_path
        self._credits_path = launch.credits
        self._credits: int | None = None  # the FIFO's fd: the kernel waits on it to print more
        self._uncredited = 0  # characters of output taken since the last credit
        self._kc: AsyncKernelClient | None = None
        self._images_dir = images_dir
        self._text_cap = text_cap
        self._grace = interrupt_grace
        self._start_timeout = start_timeout
        self._notify = notify
        self._drain = drain
        self._queue = asyncio.Lock()
        self._lifecycle = asyncio.Lock()  # one restart or shutdown at a time
        self._current: Execution | None = None
        self._current_msg_id: str | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # other shell requests
        self._tasks: list[asyncio.Task[None]] = []
        self._restarting = False
        self._pending_restart: asyncio.Task[None] | None = None
        self.closed = False
        self.exit_code: int | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def adopt(self, notify: Notify, name: str | None) -> None:
        """Hands a kernel from the warm pool to the client: its notifications go out from now on,
        starting with its state."""
        self._notify = notify
        self.name = name
        notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, self.state))

    async def start(self) -> None:
        self._notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, "starting"))
        if self._credits_path is not None:
            # read-write, so that neither end's open waits for the other
            self._credits = os.open(self._credits_path, os.O_RDWR | os.O_NONBLOCK)
        await self._km.start_kernel(**self._launch_kwargs)
        await self._connect()

    async def _connect(self) -> None:
        kc = self._km.client()
        kc.start_channels(hb=False)  # the monitor watches the process itself
        try:
            await kc.wait_for_ready(timeout=self._start_timeout)
        except BaseException as exc:
            kc.stop_channels()
            if not isinstance(exc, RuntimeError | TimeoutError):
                raise
            raise errors.KernelDied(
                f"kernel {self.kernel_id} did not start: {exc}; its output:\n{self._log_tail()}",
                {"kernelId": self.kernel_id},
            ) from exc
        self._kc = kc
        self.exit_code = None
        self._tasks = [
            asyncio.create_task(self._read_iopub(kc), name=f"iopub-{self.kernel_id}"),
            asyncio.create_task(self._read_shell(kc), name=f"shell-{self.kernel_id}"),
            asyncio.create_task(self._monitor(), name=f"monitor-{self.kernel_id}"),
        ]
        self._set_state("idle")

    async def _disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._kc is not None:
            self._kc.stop_channels()
            self._kc = None

    async def shutdown(self, now: bool = False) -> None:
        """Stops the kernel process; an execution still running ends as `died`."""
        if self.closed:
            return
        self.closed = True
        self._end_current()
        if self._pending_restart is not None:
            self._pending_restart.cancel()
        async with self._lifecycle:
            await self._disconnect()
            try:
                await self._km.shutdown_kernel(now=now)
            except Exception:
                log.exception("kernel %s: shutdown failed; killing it", self.kernel_id)
                with contextlib.suppress(Exception):
                    await self._km.shutdown_kernel(now=True)
        if self._credits is not None:
            os.close(self._credits)
            self._credits = None
        self._set_state("dead")

    async def interrupt(self) -> None:
        self._check_usable()
        await self._km.interrupt_kernel()

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
            await self._disconnect()
            try:
                await self._km.restart_kernel(now=True)
            except Exception:
                # the process may be long gone; start anew with the same settings
                log.info("kernel %s: restart failed, starting a new process", self.kernel_id)
                with contextlib.suppress(Exception):
                    await self._km.shutdown_kernel(now=True, restart=True)
                await self._km.start_kernel(**self._launch_kwargs)
            await self._connect()
        except BaseException:
            self._set_state("dead")
            raise
        finally:
            self._restarting = False

    # -- editor requests ---------------------------------------------------------------------

    async def ask(
        self, kind: Literal["complete", "inspect"], code: str, cursor_pos: int, within: float
    ) -> dict[str, Any] | None:
        """A `complete_request` or `inspect_request`'s reply, or None when the kernel cannot
        answer: a kernel that runs an execution would answer only after it, and an editor must
        not wait for that."""
        kc = self._kc
        if kc is None or self.closed or self.state == "dead" or self._queue.locked():
            return None
        msg_id = kc.complete(code, cursor_pos) if kind == "complete" else kc.inspect(code, cursor_pos)
        waiter = self._replies[msg_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(waiter, within)
        except TimeoutError:
            return None
        finally:
            self._replies.pop(msg_id, None)

    # -- execution --------------------------------------------------------------------------

    async def execute(self, params: t.ExecuteParams) -> t.ExecuteResult:
        execution_id = params.execution_id or uuid.uuid4().hex
        execution = Execution(
            execution_id=execution_id,
            kernel_id=self.kernel_id,
            images_dir=self._images_dir,
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
        assert self._kc is not None
        msg_id = self._kc.execute(params.code, store_history=True, allow_stdin=False, stop_on_error=False)
        self._current, self._current_msg_id = execution, msg_id
        try:
            try:
                async with asyncio.timeout(params.timeout):
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

    async def _stop(self, execution: Execution, status: t.ExecuteStatus, what: str) -> t.ExecuteResult:
        """Interrupts a running execution; restarts the kernel if it does not stop in time."""
        if self.exit_code is None and self.state != "dead":
            with contextlib.suppress(Exception):
                await self._km.interrupt_kernel()
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
        else:
            why = f"the kernel process ended{self._exit_text()}; restart it to go on"
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
        if self.state == "dead" or self._kc is None:
            raise errors.KernelDied(
                f"kernel {self.kernel_id} is dead{self._exit_text()}; "
                f"restart it with {methods.RESTART_KERNEL}",
                {"kernelId": self.kernel_id},
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _exit_text(self) -> str:
        return "" if self.exit_code is None else f" (exit code {self.exit_code})"

    # -- background tasks -------------------------------------------------------------------

    def _set_state(self, state: t.KernelState) -> None:
        if state != self.state:
            self.state = state
            self._notify(methods.KERNEL_STATUS, t.KernelStatusNotification(self.kernel_id, state))

    async def _read_iopub(self, kc: AsyncKernelClient) -> None:
        reader = Reader(kc.iopub_channel.socket, kc.session.auth)
        while True:
            msg = await reader.next()
            content = msg.content
            if msg.msg_type == "status" and not self._restarting:
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
                else:
                    execution.on_iopub(msg.msg_type, content)
            # a client that reads slowly slows the reading of the kernel's output, and the
            # daemon holds no more than the writer's high-water mark
            await self._drain()
            if msg.msg_type == "stream":
                self._credit(content.get("text"))

    def _credit(self, text: object) -> None:
        """Lets the kernel print another MiB for each MiB of its output the client has taken."""
        if not isinstance(text, str) or self._credits is None:
            return
        self._uncredited += len(text)
        while self._uncredited >= CREDIT_CHARS:
            self._uncredited -= CREDIT_CHARS
            with contextlib.suppress(BlockingIOError):  # 64 Ki credits unused: it has enough
                os.write(self._credits, b"\0")

    async def _read_shell(self, kc: AsyncKernelClient) -> None:
        reader = Reader(kc.shell_channel.socket, kc.session.auth)
        while True:
            msg = await reader.next()
            execution = self._current
            if execution is not None and msg.parent_id == self._current_msg_id:
                execution.on_reply(msg.content)
            elif (waiter := self._replies.pop(msg.parent_id or "", None)) is not None and not waiter.done():
                waiter.set_result(msg.content)

    async def _monitor(self) -> None:
        """Notices a kernel process that is gone, and ends the execution waiting on it."""
        provisioner = self._km.provisioner
        if provisioner is None:
            return
        code = await process_exit(provisioner)
        if self._restarting or self.closed:
            return
        self.exit_code = code
        log.warning("kernel %s died%s", self.kernel_id, self._exit_text())
        self._set_state("dead")
        self._end_current()


def _builtins(result: t.ExecuteResult) -> Any:
    return msgspec.to_builtins(result)
