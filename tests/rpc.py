"""A raw framed-JSON peer for tests: writes bytes to `cellbox serve` and reads frames back.

It knows nothing of cellbox's client, so tests with it check the wire itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SERVE = [sys.executable, "-m", "cellboxd", "serve"]


class Daemon:
    def __init__(self, *, initialize: bool = True, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            SERVE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.notifications: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._next_id = 0
        self._responses: dict[int | str | None, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if initialize:
            self.init_result = self.request("initialize", {"processId": os.getpid(), "capabilities": {}})
            self.notify("initialized", {})

    # -- writing ----------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: Any) -> None:
        body = json.dumps(message).encode()
        self.send_bytes(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def start(self, method: str, params: Any = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self._next_id

    def request(self, method: str, params: Any = None, timeout: float = 60) -> Any:
        response = self.response(self.start(method, params), timeout)
        if "error" in response:
            raise AssertionError(f"{method} failed: {response['error']}")
        return response["result"]

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    self.messages.put(None)
                    return
                if not line.strip():
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            assert length is not None, "a frame without Content-Length"
            self.messages.put(json.loads(stream.read(length)))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace"))

    def next_message(self, timeout: float = 60) -> dict[str, Any]:
        message = self.messages.get(timeout=timeout)
        if message is None:
            raise EOFError("the daemon closed its stdout")
        if "id" not in message or "method" in message:
            self.notifications.append(message)
        return message

    def response(self, msg_id: int | str | None, timeout: float = 60) -> dict[str, Any]:
        """The answer to `msg_id` (None: an error answer with id null); notifications are kept."""
        deadline = time.monotonic() + timeout
        while msg_id not in self._responses:
            message = self.next_message(max(0.01, deadline - time.monotonic()))
            if "method" not in message:
                self._responses[message.get("id")] = message
        return self._responses.pop(msg_id)

    def wait_for(
        self, method: str, match: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        """The params of the first `method` notification `match` accepts, waiting for it to come;
        responses read meanwhile are kept for `response`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for note in self.notifications[seen:]:
                if note.get("method") == method and match(note["params"]):
                    return note["params"]
            seen = len(self.notifications)
            message = self.next_message(max(0.01, deadline - time.monotonic()))
            if "method" not in message:
                self._responses[message.get("id")] = message

    def notes(self, method: str) -> list[dict[str, Any]]:
        return [n["params"] for n in self.notifications if n.get("method") == method]

    # -- ending -----------------------------------------------------------------------------

    def close(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, OSError, EOFError, queue.Empty):
                self.request("shutdown", timeout=30)
            with contextlib.suppress(OSError):
                self.notify("exit")
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
