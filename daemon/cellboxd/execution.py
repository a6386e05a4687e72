"""One execution: what a cell's IOPub messages and shell reply add up to.

It streams each output as a notification the moment it arrives and collects the
ExecuteResult: `text` capped at the daemon's limit, rich outputs, images saved to the
workspace's `images/` folder, the error, and how the execution ended.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellbox import methods
from cellbox import types as t

log = logging.getLogger(__name__)

Notify = Callable[[str, Any], None]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# MIME type -> file extension of images saved to the workspace; SVG is text, the rest base64
_IMAGE_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
}


def plain(lines: list[str]) -> list[str]:
    """Traceback lines without the terminal colour codes IPython puts in them."""
    return [_ANSI.sub("", line) for line in lines]


class Execution:
    def __init__(
        self,
        *,
        execution_id: str,
        kernel_id: str,
        images_dir: Path,
        text_cap: int,
        notify: Notify,
    ) -> None:
        self.execution_id = execution_id
        self.kernel_id = kernel_id
        self._images_dir = images_dir
        self._text_cap = text_cap
        self._notify = notify
        self._text: list[str] = []
        self._text_len = 0
        self.truncated = False
        self.outputs: list[t.Output] = []
        self.error: t.ErrorInfo | None = None
        self.execution_count: int | None = None
        self.reply_status: str | None = None
        self._idle = False
        # resolved when the kernel has gone idle and replied, or has gone away
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- messages from the kernel -----------------------------------------------------------

    def on_iopub(self, msg_type: str, content: dict[str, Any]) -> None:
        if msg_type == "stream":
            text = content.get("text", "")
            stream: t.Stream = "stderr" if content.get("name") == "stderr" else "stdout"
            self._notify(
                methods.OUTPUT, t.OutputNotification(self.execution_id, self.kernel_id, stream, text)
            )
            self._add_text(text)
        elif msg_type in ("execute_result", "display_data"):
            self._on_output(msg_type, content)
        elif msg_type == "error":
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
        if not self.finished.done():
            self.finished.set_result(None)

    def _maybe_finish(self) -> None:
        if self._idle and self.reply_status is not None:
            self.end()

    def _add_text(self, text: str) -> None:
        if self.truncated:
            return
        room = self._text_cap - self._text_len
        if len(text) > room:
            text = text[:room]
            self.truncated = True
        self._text.append(text)
        self._text_len += len(text)

    def _on_output(self, msg_type: str, content: dict[str, Any]) -> None:
        data: dict[str, Any] = content.get("data") or {}
        metadata: dict[str, Any] = content.get("metadata") or {}
        path = self._save_image(data)
        self.outputs.append(t.Output(data, metadata, path))
        self._notify(
            methods.DISPLAY, t.DisplayNotification(self.execution_id, self.kernel_id, data, metadata, path)
        )
        if msg_type == "execute_result" and isinstance(text := data.get("text/plain"), str):
            self._add_text(text if text.endswith("\n") else text + "\n")

    def _save_image(self, data: dict[str, Any]) -> str | None:
        for mime, ext in _IMAGE_EXT.items():
            value = data.get(mime)
            if not isinstance(value, str):
                continue
            try:
                payload = value.encode() if ext == "svg" else base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                log.warning("execution %s: %s output is not valid base64", self.execution_id, mime)
                return None
            path = self._images_dir / f"{self.execution_id}-{len(self.outputs) + 1}.{ext}"
            try:
                self._images_dir.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)
            except OSError as exc:
                log.warning("cannot save an image to %s: %s", path, exc)
                return None
            return str(path)
        return None

    # -- the result -------------------------------------------------------------------------

    def result(
        self, status: t.ExecuteStatus | None = None, error: t.ErrorInfo | None = None
    ) -> t.ExecuteResult:
        """The ExecuteResult; `status` and `error` override what the kernel said."""
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
