"""Error codes of the cellbox protocol and the exceptions that stand for them.

The daemon raises these and answers them as JSON-RPC errors; the Python client raises the
same classes for the error answers it receives. `error_from_response` maps a code back.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    SERVER_NOT_INITIALIZED = -32002
    REQUEST_CANCELLED = -32800
    REQUEST_FAILED = -32803
    SANDBOX_NOT_FOUND = 1001
    KERNEL_NOT_FOUND = 1002
    BACKEND_UNAVAILABLE = 1003
    IMAGE_NOT_FOUND = 1004
    INSTALL_FAILED = 1005
    MODULE_NOT_FOUND = 1006
    KERNEL_DIED = 1007
    BUILD_FAILED = 1008
    INVALID_DEPENDENCIES = 1009
    FILE_NOT_FOUND = 1010
    MCP_SERVER_FAILED = 1011


class CellboxError(Exception):
    """Base of every error cellbox reports; `data` is the JSON-RPC `error.data`."""

    code: ClassVar[int] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class TransportError(CellboxError):
    """The daemon could not be started or reached, or it went away."""


# --- JSON-RPC's own errors ---------------------------------------------------------------


class ProtocolError(CellboxError):
    """A JSON-RPC level error: the message itself was wrong, not what it asked for."""


class ParseError(ProtocolError):
    code = ErrorCode.PARSE_ERROR


class InvalidRequest(ProtocolError):
    code = ErrorCode.INVALID_REQUEST


class MethodNotFound(ProtocolError):
    code = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(ProtocolError):
    code = ErrorCode.INVALID_PARAMS


class InternalError(ProtocolError):
    code = ErrorCode.INTERNAL_ERROR


class ServerNotInitialized(ProtocolError):
    code = ErrorCode.SERVER_NOT_INITIALIZED


class RequestCancelled(ProtocolError):
    """The request was cancelled; for `execute`, `data["result"]` holds the partial result."""

    code = ErrorCode.REQUEST_CANCELLED


class RequestFailed(ProtocolError):
    """LSP's RequestFailed: the request was valid, but the sandbox's system refused it (no
    room left, a read-only file, a sandbox whose container is gone)."""

    code = ErrorCode.REQUEST_FAILED


# --- cellbox's application errors --------------------------------------------------------


class SandboxNotFound(CellboxError):
    code = ErrorCode.SANDBOX_NOT_FOUND


class KernelNotFound(CellboxError):
    code = ErrorCode.KERNEL_NOT_FOUND


class BackendUnavailable(CellboxError):
    code = ErrorCode.BACKEND_UNAVAILABLE


class ImageNotFound(CellboxError):
    code = ErrorCode.IMAGE_NOT_FOUND


class InstallFailed(CellboxError):
    """`data["log"]` holds the installer's output."""

    code = ErrorCode.INSTALL_FAILED


class ModuleNotFound(CellboxError):
    """`data["module"]` names the first module that was not found."""

    code = ErrorCode.MODULE_NOT_FOUND


class KernelDied(CellboxError):
    code = ErrorCode.KERNEL_DIED


class BuildFailed(CellboxError):
    """`data["log"]` holds the build output."""

    code = ErrorCode.BUILD_FAILED


class InvalidDependencies(CellboxError):
    """`data["line"]` names the offending line of the dependency file."""

    code = ErrorCode.INVALID_DEPENDENCIES


class FileNotFound(CellboxError):
    """`data["path"]` names the missing file or folder."""

    code = ErrorCode.FILE_NOT_FOUND


class McpServerFailed(CellboxError):
    """The MCP server could not be started or reached; `data["log"]` holds its output."""

    code = ErrorCode.MCP_SERVER_FAILED


_BY_CODE: dict[int, type[CellboxError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        ServerNotInitialized,
        RequestCancelled,
        RequestFailed,
        SandboxNotFound,
        KernelNotFound,
        BackendUnavailable,
        ImageNotFound,
        InstallFailed,
        ModuleNotFound,
        KernelDied,
        BuildFailed,
        InvalidDependencies,
        FileNotFound,
        McpServerFailed,
    )
}


def error_from_response(code: int, message: str, data: Any = None) -> CellboxError:
    """The exception for a JSON-RPC error answer; unknown codes give a plain CellboxError."""
    cls = _BY_CODE.get(code)
    err = (cls or CellboxError)(message, data if isinstance(data, dict) else None)
    if cls is None:
        err.code = code  # type: ignore[misc]
    return err
