"""MCP servers the user configures for code mode, in the `mcpServers` format MCP hosts use.

`cellbox mcp` and `cellbox run` register them into their sandboxes; they come from the
`mcp_servers` tables of cellbox's config file and from `--mcp-config FILE` (whose entries
replace the config's of the same name). A model can add none: only these and the protocol's
own `registerMcpServer` make servers.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import re
from pathlib import Path
from typing import Any, Final, get_args

import msgspec

from cellbox import types as t


class McpConfigError(Exception):
    """A configured server that cannot be used; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class ConfiguredServer:
    """An MCP server the user configured, registered into a sandbox as `mcptools.<name>`."""

    spec: t.McpServerSpec
    approval: t.Approval = "ask"

    def registration(self) -> dict[str, Any]:
        """The keyword arguments of the client's `register_mcp_server` (async or sync)."""
        s = self.spec
        return {
            "command": s.command,
            "args": s.args,
            "env": s.env,
            "cwd": s.cwd,
            "url": s.url,
            "headers": s.headers,
            "approval": self.approval,
        }


_TRANSPORT_TYPES: Final = {"stdio": "command", "http": "url", "streamable-http": "url"}


def load(path: Path) -> dict[str, ConfiguredServer]:
    """The servers of a file in the `{"mcpServers": {name: server}}` format of MCP hosts: a
    stdio server `{command, args?, env?, cwd?}` or a streamable HTTP one `{url, headers?}`,
    each with an optional `type` ("stdio", "http") and cellbox's `approval` ("ask", "never")."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise McpConfigError(f"cannot read {path}: {e.strerror}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise McpConfigError(f"{path} is not JSON: {e}") from e
    servers = document.get("mcpServers") if isinstance(document, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f'{path}: expected an object {{"mcpServers": {{"NAME": {{...}}, ...}}}}')
    return {name: _config_entry(f"{path}: mcpServers.{name}", name, entry) for name, entry in servers.items()}


def _config_entry(where: str, name: str, entry: Any) -> ConfiguredServer:
    try:
        msgspec.convert(name, t.ServerName)
    except msgspec.ValidationError:
        suggestion = re.sub(r"\W", "_", name.strip(), flags=re.ASCII) or "server"
        if not suggestion.isidentifier() or keyword.iskeyword(suggestion):
            suggestion = f"_{suggestion}"
        raise McpConfigError(
            f"{where}: the name must be a Python identifier of at most 64 characters, not a keyword, "
            f"since the sandbox imports the server's tools as mcptools.<name>: e.g. {suggestion!r}"
        ) from None
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where}: expected an object with `command` or `url`")
    fields = dict(entry)
    approval = fields.pop("approval", "ask")
    if approval not in get_args(t.Approval):
        raise McpConfigError(f"{where}: `approval` is 'ask' or 'never', not {approval!r}")
    kind = fields.pop("type", None)
    if kind is not None and kind not in _TRANSPORT_TYPES:
        raise McpConfigError(f"{where}: `type` {kind!r} is not served: 'stdio' or 'http' (streamable HTTP)")
    try:
        spec = msgspec.convert(fields, t.McpServerSpec)
    except msgspec.ValidationError as e:
        raise McpConfigError(f"{where}: {e}") from None
    if kind is not None and getattr(spec, _TRANSPORT_TYPES[kind]) is None:
        raise McpConfigError(f"{where}: a server of `type` {kind!r} needs `{_TRANSPORT_TYPES[kind]}`")
    return ConfiguredServer(spec, approval)


def configured(path: str | None) -> dict[str, ConfiguredServer]:
    """The servers of cellbox's config file, then those of `path` (a `--mcp-config` file)."""
    from cellboxd.config import ConfigError, config_file, load_settings

    try:
        settings = load_settings()
    except ConfigError as e:
        raise McpConfigError(str(e)) from None
    where = f"{config_file()}: mcp_servers"
    servers = {
        name: _config_entry(f"{where}.{name}", name, entry) for name, entry in settings.mcp_servers.items()
    }
    if path is not None:
        servers.update(load(Path(path)))
    return servers
