"""A sandbox's files through the protocol: writeFile, readFile, listFiles, deleteFile.

Every operation runs inside the sandbox, done by its agent (sandbox/files.py) with the
sandbox's own rights, on every backend: the daemon never opens a path that the sandbox's code
can create or replace. Here the daemon holds to its per-call cap and turns the agent's
refusals into the protocol's errors.
"""

from __future__ import annotations

import datetime
from typing import Any

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import SandboxRuntime
from cellboxd.channel import AgentError, ChannelClosed

LIST_LIMIT = 100_000  # entries in one listFiles answer


async def write(runtime: SandboxRuntime, params: t.WriteFileParams, cap: int) -> t.WriteFileResult:
    if len(params.content) > cap:
        raise errors.InvalidParams(
            f"Invalid params: `content` holds {len(params.content)} bytes, more than the {cap} one call "
            "takes: write larger files in pieces with `append`"
        )
    result, _ = await _call(
        runtime, "file.write", params.path, params.content, append=params.append, mode=params.mode
    )
    return t.WriteFileResult(size=int(result["size"]))


async def read(runtime: SandboxRuntime, params: t.ReadFileParams, cap: int) -> t.ReadFileResult:
    length = cap if params.length is None else min(params.length, cap)
    result, content = await _call(runtime, "file.read", params.path, offset=params.offset, length=length)
    size = int(result["size"])
    return t.ReadFileResult(content=content, size=size, eof=params.offset + len(content) >= size)


async def list_files(runtime: SandboxRuntime, params: t.ListFilesParams) -> t.ListFilesResult:
    result, _ = await _call(runtime, "file.list", params.path, recursive=params.recursive, limit=LIST_LIMIT)
    entries = [
        t.FileEntry(
            path=str(entry["path"]),
            kind=entry["kind"],
            size=int(entry["size"]),
            modified_at=_iso(entry["mtime"]),
        )
        for entry in result["entries"]
        if entry.get("kind") in ("file", "dir", "symlink")
    ]
    return t.ListFilesResult(entries=entries, truncated=bool(result.get("truncated")))


async def delete(runtime: SandboxRuntime, params: t.DeleteFileParams) -> None:
    await _call(runtime, "file.delete", params.path, recursive=params.recursive)


async def create(runtime: SandboxRuntime, path: str, content: bytes) -> bool:
    """Writes a new file (an image of a display); False when the name is taken."""
    result, _ = await _call(runtime, "file.create", path, content)
    return bool(result["created"])


async def _call(
    runtime: SandboxRuntime, op: str, path: str, blob: bytes = b"", **args: object
) -> tuple[dict[str, Any], bytes]:
    try:
        return await (await runtime.channel()).call(op, blob, path=path, **args)
    except AgentError as exc:
        raise _error(exc) from None
    except ChannelClosed as exc:
        raise errors.RequestFailed(f"the sandbox cannot be reached: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # an answer of the wrong shape
        raise errors.RequestFailed(f"the sandbox's agent answered {op} wrongly: {exc!r}") from None


def _error(exc: AgentError) -> errors.CellboxError:
    if exc.kind == "not_found":
        return errors.FileNotFound(exc.message, {"path": exc.path})
    if exc.kind in ("invalid", "exists"):
        return errors.InvalidParams(f"Invalid params: `path`: {exc.message}")
    return errors.RequestFailed(exc.message)


def _inside(path: object) -> bool:
    """Whether `path` is a plain relative path that stays in the workspace."""
    if not isinstance(path, str) or not path or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _iso(mtime: object) -> str:
    seconds = float(mtime) if isinstance(mtime, int | float) else 0.0
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")
