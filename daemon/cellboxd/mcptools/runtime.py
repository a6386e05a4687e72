"""`mcptools`: the package of MCP servers' tools in a sandbox (this file is its `__init__`).

The daemon writes it into the sandbox, beside one subpackage per registered server whose
modules call `call`. A call goes to the sandbox's agent over a unix socket that the agent made
for this kernel alone (its path is in CELLBOX_TOOLS), and from the agent to the daemon over
the sandbox's channel: the sandbox needs no network, and the tools' secrets stay outside it.
The daemon asks for approval where the server wants it, calls the tool, and answers. An
interrupt (or a timeout of the execution) while a call waits ends the call.

It runs in the sandbox's interpreter: standard library only, Python 3.8 and later.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

__all__ = ["ToolCallRejected", "ToolError", "call"]

_HEADER = struct.Struct(">I")
_REQUEST = 3 << 20  # bytes of a call's request the sandbox's agent takes


class ToolError(Exception):
    """The tool failed: the server said so, or it could not be reached."""


class ToolCallRejected(Exception):
    """The call was not approved, so the tool did not run."""


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(min(size - len(data), 1 << 20))
        if not piece:
            raise ToolError("the sandbox's agent closed the connection before the tool answered")
        data += piece
    return data


def _display(images: list[dict[str, str]]) -> None:
    """Shows a tool's images as the cell's outputs (in a kernel; elsewhere they are dropped)."""
    try:
        from IPython.display import display
    except ImportError:
        return
    for image in images:
        display({image["mime"]: image["data"]}, raw=True)  # type: ignore[no-untyped-call]


def call(server: str, tool: str, arguments: dict[str, Any], optional: tuple[str, ...] = ()) -> Any:
    """Runs `tool` of `server` with `arguments` (a dict for the tool's input schema; those named
    in `optional` are left out when None) through the daemon: the tool's structured content,
    or its text."""
    arguments = {k: v for k, v in arguments.items() if v is not None or k not in optional}
    path = os.environ.get("CELLBOX_TOOLS")
    if not path:
        raise ToolError("this kernel was not started by cellbox: no way to reach MCP tools")
    try:
        request = json.dumps({"server": server, "tool": tool, "arguments": arguments}).encode()
    except (TypeError, ValueError) as e:
        raise ToolError(f"the arguments are not JSON: {e}") from None
    if len(request) > _REQUEST:
        raise ToolError(f"the call's arguments take more than {_REQUEST >> 20} MiB")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(_HEADER.pack(len(request)) + request)
            (size,) = _HEADER.unpack(_receive(sock, _HEADER.size))
            reply = json.loads(_receive(sock, size))
    except OSError as e:
        raise ToolError(f"the sandbox's agent cannot be reached: {e}") from None
    if reply.get("ok"):
        _display(reply.get("images") or [])
        return reply.get("result")
    error = ToolCallRejected if reply.get("kind") == "rejected" else ToolError
    raise error(reply.get("message", "the tool call failed"))
