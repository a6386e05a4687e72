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


def answer(kind: str, message: str) -> bytes:
    """A refusal or failure, as a kernel's call gets it."""
    return json.dumps({"ok": False, "kind": kind, "message": message}).encode()
