"""A sandbox's files through the protocol: writeFile, readFile, listFiles, deleteFile.

Every operation runs inside the sandbox, done by its agent (sandbox/files.py) with the
sandbox's own rights, on every backend: the daemon never opens a path that the sandbox's code
can create or replace. Here the daemon holds to its per-call cap and turns the agent's
refusals into the protocol's errors.
"""

from __future__ import annotations

import datetime
from typing import TypeVar

import msgspec

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import SandboxRuntime
from cellboxd.channel import AgentError, ChannelClosed

LIST_LIMIT = 100_000  # entries in one listFiles answer


# the agent's answers, as the daemon takes them (other fields are ignored)
class _Size(msgspec.Struct):
    size: int


class _Entry(msgspec.Struct):
    path: str
    kind: t.FileKind
    size: int
    mtime: float


class _Listing(msgspec.Struct):
    entries: list[_Entry]
    truncated: bool = False


_Answer = TypeVar("_Answer", bound=msgspec.Struct)


async def write(runtime: SandboxRuntime, params: t.WriteFileParams, cap: int) -> t.WriteFileResult:
    if len(params.content) > cap:
        raise errors.InvalidParams(
            f"Invalid params: `content` holds {len(params.content)} bytes, more than the {cap} one call "
            "takes: write larger files in pieces with `append`"
        )
    written, _ = await _call(
        runtime, _Size, "file.write", params.path, params.content, append=params.append, mode=params.mode
    )
    return t.WriteFileResult(size=written.size)


async def read(runtime: SandboxRuntime, params: t.ReadFileParams, cap: int) -> t.ReadFileResult:
    length = cap if params.length is None else min(params.length, cap)
    found, content = await _call(
        runtime, _Size, "file.read", params.path, offset=params.offset, length=length
    )
    if len(content) > length:
        raise errors.RequestFailed(f"the sandbox's agent answered file.read with more than {length} bytes")
    return t.ReadFileResult(content=content, size=found.size, eof=params.offset + len(content) >= found.size)


async def list_files(runtime: SandboxRuntime, params: t.ListFilesParams) -> t.ListFilesResult:
    listing, _ = await _call(
        runtime, _Listing, "file.list", params.path, recursive=params.recursive, limit=LIST_LIMIT
    )
    entries = [
        t.FileEntry(path=entry.path, kind=entry.kind, size=entry.size, modified_at=_iso(entry.mtime))
        for entry in listing.entries[:LIST_LIMIT]
    ]
    truncated = listing.truncated or len(listing.entries) > LIST_LIMIT
    return t.ListFilesResult(entries=entries, truncated=truncated)


async def delete(runtime: SandboxRuntime, params: t.DeleteFileParams) -> None:
    await _call(runtime, msgspec.Struct, "file.delete", params.path, recursive=params.recursive)


async def _call(
    runtime: SandboxRuntime, answer: type[_Answer], op: str, path: str, blob: bytes = b"", **args: object
) -> tuple[_Answer, bytes]:
    try:
        result, data = await (await runtime.channel()).call(op, blob, path=path, **args)
        return msgspec.convert(result, answer), data
    except AgentError as exc:
        raise _error(exc) from None
    except ChannelClosed as exc:
        raise errors.RequestFailed(f"the sandbox cannot be reached: {exc}") from None
    except msgspec.ValidationError as exc:  # an answer of the wrong shape
        raise errors.RequestFailed(f"the sandbox's agent answered {op} wrongly: {exc}") from None


def _error(exc: AgentError) -> errors.CellboxError:
    if exc.kind == "not_found":
        return errors.FileNotFound(exc.message, {"path": exc.path})
    if exc.kind in ("invalid", "exists"):
        return errors.InvalidParams(f"Invalid params: `path`: {exc.message}")
    return errors.RequestFailed(exc.message)


def _iso(mtime: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
    except (OverflowError, OSError, ValueError):  # a time the sandbox made up
        moment = datetime.datetime.fromtimestamp(0, datetime.UTC)
    return moment.isoformat(timespec="milliseconds")
