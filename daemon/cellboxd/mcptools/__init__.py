"""MCP servers' tools inside a sandbox: registration, the generated package, and calls.

`cellbox/registerMcpServer` connects the daemon to a server (servers.py), writes the package
`mcptools.<name>` into the sandbox's `skills/` (codegen.py; `mcptools` itself is runtime.py),
and from then on serves the calls its modules make. A call comes from a kernel over the
sandbox's channel while one of its executions runs; where the server asks for approval, the
daemon's client is asked first (`cellbox/approveToolCall`), the time that takes held out of the
execution's timeout. The answer goes back as a small JSON object:
`{"ok": true, "result": ...}` or `{"ok": false, "kind": "tool"|"rejected"|"failed", "message"}`.
"""

from __future__ import annotations

import json
from typing import Any


def preview(arguments: dict[str, Any], limit: int = 2000) -> str:
    """A tool call's arguments for a person to approve: every key, each value's JSON cut to its
    share of `limit` (the sandbox chose them, and must not hide one behind another). JSON's
    escapes keep terminal control sequences out."""
    if not arguments:
        return "(no arguments)"
    share = max(40, limit // len(arguments))
    lines = []
    for key, value in arguments.items():
        text = json.dumps(value)
        if len(text) > share:
            text = text[:share] + f"... ({len(text)} characters in all)"
        lines.append(f"  {json.dumps(key)}: {text}")
    return "\n".join(lines)


def answer(kind: str, message: str) -> bytes:
    """A refusal or failure, as a kernel's call gets it."""
    return json.dumps({"ok": False, "kind": kind, "message": message}).encode()
