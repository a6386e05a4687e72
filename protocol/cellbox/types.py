"""The wire types of the cellbox protocol, version 1.

These msgspec structs are the single source of truth: the daemon decodes params into them
(a bad field answers -32602 naming its path), the Python client encodes them, and
`protocol/schema.json` is generated from them for clients in other languages.

Field names are snake_case in Python and camelCase on the wire. Optional fields default to
`None` (or an empty collection) and are left out of encoded messages; unknown fields are
ignored, as LSP peers do, so that newer clients can talk to older daemons.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1

Backend = Literal["local", "docker", "bubblewrap"]
Network = Literal["bridge", "none"]
Variant = Literal["minimal", "basic", "example"]
Stream = Literal["stdout", "stderr"]
KernelState = Literal["starting", "idle", "busy", "restarting", "dead"]
ExecuteStatus = Literal["ok", "error", "timeout", "cancelled", "died"]
ProgressToken = int | str

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
# A dotted module name as Python's import system accepts it.
ModuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]


class Struct(msgspec.Struct, rename="camel", omit_defaults=True):
    """Base of every wire type: camelCase on the wire, defaults left out when encoding."""


# --- lifecycle ---------------------------------------------------------------------------


class PoolSpec(Struct, forbid_unknown_fields=True):
    """How many sandboxes of a backend and image the warm pool keeps ready, each with one
    kernel started. `image` is for docker only: a tag or a built-in variant (default `minimal`)."""

    backend: Backend = "local"
    image: NonEmptyStr | None = None
    size: Annotated[int, msgspec.Meta(ge=0, le=32)] = 1

    def __post_init__(self) -> None:
        if self.backend == "local" and self.image is not None:
            raise ValueError("a pool's `image` needs backend 'docker'")


class InitializationOptions(Struct):
    """`initializationOptions` of LSP `initialize`."""

    default_backend: Backend | None = None
    data_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    pool: list[PoolSpec] | None = None


class CellboxCapabilities(Struct):
    """`capabilities.experimental.cellbox` of the `initialize` result; `file_cap` is the most
    bytes one readFile answers and one writeFile takes."""

    protocol_version: int
    backends: list[Backend]
    default_backend: Backend
    file_cap: int | None = None


# --- sandboxes ---------------------------------------------------------------------------


class Mount(Struct):
    source: NonEmptyStr
    target: NonEmptyStr
    read_only: bool = False


class Limits(Struct):
    memory_mb: Annotated[int, msgspec.Meta(gt=0)] | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0)] | None = None
    pids: Annotated[int, msgspec.Meta(gt=0)] | None = None


class CreateSandboxParams(Struct):
    backend: Backend | None = None
    image: NonEmptyStr | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    mounts: list[Mount] = msgspec.field(default_factory=list)
    limits: Limits | None = None
    network: Network | None = None
    runtime: NonEmptyStr | None = None
    name: str | None = None
    work_done_token: ProgressToken | None = None


class CreateSandboxResult(Struct):
    """`workspace` is the workspace's path on the daemon's machine, present only where that
    machine can see it (the local backend); `sandbox_workspace` is its path as the sandbox's
    kernels see it (their working directory), always present."""

    sandbox_id: str
    backend: Backend
    sandbox_workspace: str
    workspace: str | None = None
    image: str | None = None


class ListSandboxesParams(Struct):
    pass


class SandboxInfo(Struct):
    sandbox_id: str
    backend: Backend
    kernels: list[str]
    created_at: str
    image: str | None = None
    name: str | None = None


class PoolStatus(Struct):
    """One kind of sandbox the warm pool keeps: how many it should, how many are ready now."""

    backend: Backend
    size: int
    ready: int
    image: str | None = None


class ListSandboxesResult(Struct):
    sandboxes: list[SandboxInfo]
    pool: list[PoolStatus] = msgspec.field(default_factory=list)


class DestroySandboxParams(Struct):
    sandbox_id: NonEmptyStr


# --- kernels -----------------------------------------------------------------------------


class StartKernelParams(Struct):
    sandbox_id: NonEmptyStr
    name: str | None = None


class StartKernelResult(Struct):
    kernel_id: str
    sandbox_id: str


class KernelParams(Struct):
    """Params of `shutdownKernel`, `interruptKernel` and `restartKernel`."""

    kernel_id: NonEmptyStr


class ExecuteParams(Struct):
    kernel_id: NonEmptyStr
    code: str
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    execution_id: NonEmptyStr | None = None


class ErrorInfo(Struct):
    ename: str
    evalue: str
    traceback: list[str]


class Output(Struct):
    """One `execute_result` or `display_data`; binary MIME types are base64 strings. An image
    is also saved in the workspace: `file` is its path relative to the workspace (readable with
    `readFile`), `path` its absolute path on the daemon's machine where that machine sees it."""

    data: dict[str, Any]
    metadata: dict[str, Any]
    path: str | None = None
    file: str | None = None


class ExecuteResult(Struct):
    execution_id: str
    status: ExecuteStatus
    text: str
    outputs: list[Output]
    truncated: bool
    execution_count: int | None = None
    error: ErrorInfo | None = None


# --- packages and skills -----------------------------------------------------------------


class InstallPackageParams(Struct):
    sandbox_id: NonEmptyStr
    packages: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)]
    upgrade: bool = False
    work_done_token: ProgressToken | None = None


class InstalledPackage(Struct):
    name: str
    version: str


class InstallPackageResult(Struct):
    installed: list[InstalledPackage]


class GetSkillSourcesParams(Struct):
    sandbox_id: NonEmptyStr
    modules: Annotated[list[ModuleName], msgspec.Meta(min_length=1)]


class GetSkillSourcesResult(Struct):
    sources: dict[str, str]
    formatted: str


# --- files -------------------------------------------------------------------------------

FileKind = Literal["file", "dir", "symlink"]
# a path relative to the sandbox's workspace; the daemon checks where it leads
FilePath = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class WriteFileParams(Struct):
    sandbox_id: NonEmptyStr
    path: FilePath
    content: bytes  # base64 on the wire
    append: bool = False
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] | None = None


class WriteFileResult(Struct):
    size: int  # the file's size after the write


class ReadFileParams(Struct):
    sandbox_id: NonEmptyStr
    path: FilePath
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    length: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ReadFileResult(Struct):
    content: bytes  # base64 on the wire; at most the daemon's per-call cap
    size: int  # the whole file's
    eof: bool


class ListFilesParams(Struct):
    sandbox_id: NonEmptyStr
    path: FilePath = "."
    recursive: bool = False


class FileEntry(Struct):
    path: str  # relative to the workspace
    kind: FileKind
    size: int
    modified_at: str


class ListFilesResult(Struct):
    entries: list[FileEntry]
    truncated: bool = False  # more entries than the daemon lists in one answer


class DeleteFileParams(Struct):
    sandbox_id: NonEmptyStr
    path: FilePath
    recursive: bool = False


# --- images ------------------------------------------------------------------------------


class BuildImageParams(Struct):
    tag: NonEmptyStr | None = None
    variant: Variant | None = None
    dependencies: str | None = None
    base_image: NonEmptyStr | None = None
    root: bool = False
    work_done_token: ProgressToken | None = None


class BuildImageResult(Struct):
    tag: str
    image_id: str
    built: bool


class ListImagesParams(Struct):
    pass


class ImageInfo(Struct):
    tag: str
    image_id: str
    created_at: str
    variant: Variant | None = None


class ListImagesResult(Struct):
    images: list[ImageInfo]


# --- editor features ---------------------------------------------------------------------


class BindDocumentParams(Struct):
    uri: NonEmptyStr
    kernel_id: str | None = None


# --- MCP servers' tools inside a sandbox --------------------------------------------------

# What `mcptools.<name>` is called in the sandbox: an ASCII identifier that is not a keyword.
ServerName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(?!(False|None|True|and|as|assert|async|await|break|class|continue|def|del|elif|else"
        r"|except|finally|for|from|global|if|import|in|is|lambda|nonlocal|not|or|pass|raise|return|try"
        r"|while|with|yield)$)[A-Za-z_][A-Za-z0-9_]{0,63}$"
    ),
]
Approval = Literal["ask", "never"]


class McpServerSpec(Struct, forbid_unknown_fields=True):
    """How the daemon reaches an MCP server: `{command, args?, env?, cwd?}`, a server it runs as
    its child speaking MCP on stdin and stdout (`env` is added to the daemon's environment for
    it alone), or `{url, headers?}`, one reached over streamable HTTP. `env` and `headers` (a
    token, say) stay in the daemon and never enter the sandbox."""

    command: NonEmptyStr | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")] | None = None
    headers: dict[str, str] = {}

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either `command` (a stdio server) or `url` (streamable HTTP)")
        if self.command is not None and self.headers:
            raise ValueError("`headers` are for a `url` server")
        if self.url is not None and (self.args or self.env or self.cwd is not None):
            raise ValueError("`args`, `env` and `cwd` are for a `command` server")


class RegisterMcpServerParams(Struct):
    sandbox_id: NonEmptyStr
    name: ServerName
    server: McpServerSpec
    approval: Approval = "ask"

    def __post_init__(self) -> None:
        if self.name.endswith("\n"):  # the pattern's `$` lets a final newline through
            raise ValueError("`name` must be a Python identifier")


class McpTool(Struct):
    name: str  # the tool's name, as the server gave it
    function: str  # `mcptools.<server>.<function>.<function>`: the name made a safe identifier
    description: str


class RegisterMcpServerResult(Struct):
    name: str
    package: str  # `mcptools.<name>`
    tools: list[McpTool]


class UnregisterMcpServerParams(Struct):
    sandbox_id: NonEmptyStr
    name: ServerName


class ApproveToolCallParams(Struct):
    """The daemon's request to its client before a tool call of a server registered with
    `approval: "ask"`; the tool runs only on `{approved: true}`."""

    sandbox_id: str
    kernel_id: str
    execution_id: str
    server: str
    tool: str
    arguments: dict[str, Any]


class ApproveToolCallResult(Struct):
    approved: bool


# --- notifications from the daemon -------------------------------------------------------


class OutputNotification(Struct):
    execution_id: str
    kernel_id: str
    stream: Stream
    text: str


class DisplayNotification(Struct):
    execution_id: str
    kernel_id: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    path: str | None = None
    file: str | None = None


class KernelStatusNotification(Struct):
    kernel_id: str
    state: KernelState


# --- error data --------------------------------------------------------------------------


class ErrorData(Struct):
    """`error.data` of application errors; which fields are set depends on the code."""

    log: str | None = None  # InstallFailed, BuildFailed: the installer's or the build's output
    module: str | None = None  # ModuleNotFound: the first module not found
    line: str | None = None  # InvalidDependencies: the offending line, and its number
    line_number: int | None = None
    result: ExecuteResult | None = None  # -32800 of a cancelled execute: the partial result
    sandbox_id: str | None = None  # SandboxNotFound
    kernel_id: str | None = None  # KernelNotFound, KernelDied
    backend: Backend | None = None  # BackendUnavailable
    image: str | None = None  # ImageNotFound
    path: str | None = None  # FileNotFound: the missing file or folder
