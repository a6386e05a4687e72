"""One execution: what a cell's IOPub messages and shell reply add up to.

It streams each output as a notification and collects the ExecuteResult: `text` capped at
the daemon's limit, rich outputs, their images' files (the sandbox's agent saved them in the
workspace's `images/` folder and named them in the message), the error, and how the execution
ended. Stream text is coalesced: chunks of one stream that arrive within `COALESCE_SECONDS` of
each other go out as one notification (at most `COALESCE_CHARS` characters wait), and
anything else that goes out, or the end, sends what waits first, so order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cellbox import methods
from cellbox import types as t
from cellboxd.sandbox.outputs import IMAGE_EXT, KEY

Notify = Callable[[str, Any], None]

COALESCE_SECONDS = 0.005
COALESCE_CHARS = 64 * 1024
HELD_CAP = 3600.0  # seconds of waiting (for approvals) an execution's timeout is held for, in all

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXTS = "|".join(sorted(set(IMAGE_EXT.values())))


def _from_agent(content: dict[str, Any]) -> dict[str, Any]:
    """What the sandbox's agent added to a message (see sandbox/outputs.py)."""
    extra = content.get(KEY)
    return extra if isinstance(extra, dict) else {}


def plain(lines: list[str]) -> list[str]:
    """Traceback lines without the terminal colour codes IPython puts in them."""
    return [_ANSI.sub("", line) for line in lines]


class Execution:
    def __init__(
        self,
        *,
        execution_id: str,
        kernel_id: str,
        workspace: Path | None,
        text_cap: int,
        notify: Notify,
    ) -> None:
        self.execution_id = execution_id
        self.kernel_id = kernel_id
        self._workspace = workspace
        # the only names the agent gives this kernel's images: a claim of another is not taken
        self._image_file = re.compile(rf"images/{re.escape(kernel_id)}-[0-9]{{1,12}}\.({_EXTS})")
        self._text_cap = text_cap
        self._notify = notify
        self._text: list[str] = []
        self._text_len = 0
        self.truncated = False  # the result does not hold everything
        self._text_full = False  # `text` is at the cap
        self.outputs: list[t.Output] = []
        self._outputs_size = 0  # characters of the string values of `outputs`
        self.error: t.ErrorInfo | None = None
        self.execution_count: int | None = None
        self.reply_status: str | None = None
        self._idle = False
        self._loop = asyncio.get_running_loop()
        self._waiting: list[str] = []  # stream text not sent yet, all of `_waiting_stream`
        self._waiting_chars = 0
        self._waiting_stream: t.Stream = "stdout"
        self._flush_timer: asyncio.TimerHandle | None = None
        # resolved when the kernel has gone idle and replied, or has gone away
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self.deadline: asyncio.Timeout | None = None  # its timeout, while it runs
        self._holds = 0  # waits under way that do not count against the timeout
        self._held_since = 0.0
        self._held_due: float | None = None
        self._held = 0.0  # seconds held so far

    @contextlib.contextmanager
    def holding_time(self) -> Iterator[None]:
        """Time spent inside does not count against the execution's timeout (a wait for the
        client's approval); waits that overlap count once, and HELD_CAP in all."""
        deadline = self.deadline
        if deadline is None:
            yield
            return
        if self._holds == 0:
            self._held_since, self._held_due = self._loop.time(), deadline.when()
            with contextlib.suppress(RuntimeError):  # the execution ended meanwhile
                deadline.reschedule(None)
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0 and self._held_due is not None:
                held = min(self._loop.time() - self._held_since, max(0.0, HELD_CAP - self._held))
                self._held += held
                with contextlib.suppress(RuntimeError):
                    deadline.reschedule(self._held_due + held)

    # -- messages from the kernel -----------------------------------------------------------

    def on_iopub(self, msg_type: str, content: dict[str, Any]) -> None:
        if msg_type == "stream":
            text = content.get("text", "")
            stream: t.Stream = "stderr" if content.get("name") == "stderr" else "stdout"
            self._stream(stream, text)
            self._add_text(text)
        elif msg_type == "error":
            self._note_cut(content)
            self.error = t.ErrorInfo(
                content.get("ename", ""), content.get("evalue", ""), plain(content.get("traceback", []))
            )
        elif msg_type == "execute_input":
            self.execution_count = content.get("execution_count", self.execution_count)
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self._idle = True
            self._maybe_finish()

    def on_reply(self, content: dict[str, Any]) -> None:
        self.reply_status = content.get("status", "error")
        self.execution_count = content.get("execution_count", self.execution_count)
        if self.reply_status == "error" and self.error is None:
            self.error = t.ErrorInfo(
                content.get("ename", ""), content.get("evalue", ""), plain(content.get("traceback", []))
            )
        elif self.reply_status == "aborted" and self.error is None:
            self.error = t.ErrorInfo("Aborted", "the kernel aborted this execution", [])
        self._maybe_finish()

    def end(self) -> None:
        """Stops waiting: the kernel is gone or will not answer."""
        self.flush()
        if not self.finished.done():
            self.finished.set_result(None)

    def _maybe_finish(self) -> None:
        if self._idle and self.reply_status is not None:
            self.end()

    def _stream(self, stream: t.Stream, text: str) -> None:
        if self._waiting and stream != self._waiting_stream:
            self.flush()
        self._waiting_stream = stream
        self._waiting.append(text)
        self._waiting_chars += len(text)
        if self._waiting_chars >= COALESCE_CHARS:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = self._loop.call_later(COALESCE_SECONDS, self.flush)

    def flush(self) -> None:
        """Sends the stream text that waits, as one notification."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._waiting:
            return
        text = self._waiting[0] if len(self._waiting) == 1 else "".join(self._waiting)
        self._waiting.clear()
        self._waiting_chars = 0
        self._notify(
            methods.OUTPUT,
            t.OutputNotification(self.execution_id, self.kernel_id, self._waiting_stream, text),
        )

    def _add_text(self, text: str) -> None:
        if self._text_full:
            return
        room = self._text_cap - self._text_len
        if len(text) > room:
            text = text[:room]
            self.truncated = self._text_full = True
        self._text.append(text)
        self._text_len += len(text)

    def on_output(self, msg_type: str, content: dict[str, Any]) -> None:
        """An `execute_result` or `display_data`: sent, and kept."""
        data: dict[str, Any] = content.get("data") or {}
        metadata: dict[str, Any] = content.get("metadata") or {}
        self.flush()
        self._note_cut(content)
        file, path = self._image(content)
        self._keep(t.Output(data, metadata, path, file))
        self._notify(
            methods.DISPLAY,
            t.DisplayNotification(self.execution_id, self.kernel_id, data, metadata, path, file),
        )
        if msg_type == "execute_result" and isinstance(text := data.get("text/plain"), str):
            self._add_text(text if text.endswith("\n") else text + "\n")

    def _note_cut(self, content: dict[str, Any]) -> None:
        """A message the agent cut to its bound makes the result truncated."""
        if _from_agent(content).get("truncated") is True:
            self.truncated = True

    def _image(self, content: dict[str, Any]) -> tuple[str | None, str | None]:
        """The file the agent saved the output's image in, and its path on this machine."""
        file = _from_agent(content).get("file")
        if not isinstance(file, str) or not self._image_file.fullmatch(file):
            return None, None
        return file, None if self._workspace is None else str(self._workspace / file)

    def _keep(self, output: t.Output) -> None:
        """Adds an output to the result within the cap, which outputs count against too: a cell
        that displays without end must not grow the daemon. Past the cap an image is kept as its
        `file` and `path` alone; every output still went out as a notification."""
        size = sum(len(value) for value in output.data.values() if isinstance(value, str))
        if self._outputs_size + size > self._text_cap:
            self.truncated = True
            if output.file is None:
                return
            size = len(output.file) + len(output.path or "") + 64
            output = t.Output({}, {}, output.path, output.file)
            if self._outputs_size + size > self._text_cap:
                return
        self._outputs_size += size
        self.outputs.append(output)

    # -- the result -------------------------------------------------------------------------

    def result(
        self, status: t.ExecuteStatus | None = None, error: t.ErrorInfo | None = None
    ) -> t.ExecuteResult:
        """The ExecuteResult; `status` and `error` override what the kernel said."""
        self.flush()
        if status is None:
            status = "ok" if self.reply_status == "ok" and self.error is None else "error"
        return t.ExecuteResult(
            execution_id=self.execution_id,
            status=status,
            text="".join(self._text),
            outputs=self.outputs,
            truncated=self.truncated,
            execution_count=self.execution_count,
            error=error or self.error,
        )
