"""Settings and where things live.

Settings come, each overriding the one before, from the defaults here, the TOML file
`config.toml` in the platformdirs config dir (or `$CELLBOX_CONFIG`), the `CELLBOX_*`
environment variables, the command line, and `initializationOptions` of `initialize`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import platformdirs

from cellbox import types as t
from cellboxd.sandbox.wire import MAX_FILE_PIECE

APP = "cellbox"

LogLevel = Literal["debug", "info", "warning", "error"]


class DefaultLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a sandbox without `limits` gets, where its backend enforces limits (docker); a
    sandbox's own `limits` replace them field by field. 0 means no limit."""

    memory_mb: Annotated[int, msgspec.Meta(ge=0)] = 2048
    cpus: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    pids: Annotated[int, msgspec.Meta(ge=0)] = 512


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's settings; the TOML file uses these names (snake_case)."""

    default_backend: t.Backend = "local"
    log_level: LogLevel = "info"
    data_dir: str = ""
    cache_dir: str = ""
    log_dir: str = ""
    # kernels' IPC sockets; short, as a socket path must stay under 108 bytes
    runtime_dir: str = ""
    # characters of an ExecuteResult's `text`, and of its `outputs`; notifications are never capped
    text_cap: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000
    # seconds a kernel may take to go idle after an interrupt before it is restarted
    interrupt_grace: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    # seconds a kernel may take to answer its first kernel_info request
    kernel_start_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # installer for installPackage: "auto" takes uv when it is on PATH, else pip
    installer: Literal["auto", "pip", "uv"] = "auto"
    # the warm pool: sandboxes kept ready, each with one kernel started (see pool.py)
    pool: list[t.PoolSpec] = msgspec.field(default_factory=list)
    # bytes of file content one readFile answers or one writeFile takes
    file_cap: Annotated[int, msgspec.Meta(gt=0, le=MAX_FILE_PIECE)] = 8 << 20
    # hardening of docker sandboxes, each also a per-sandbox field where the protocol has one
    limits: DefaultLimits = msgspec.field(default_factory=DefaultLimits)
    # the container's root file system read-only; /tmp, the workspace and packages stay writable
    read_only_root: bool = True
    # MiB of the container's /tmp (memory, counted against its memory limit)
    tmp_size_mb: Annotated[int, msgspec.Meta(gt=0)] = 512
    # the engine's OCI runtime for sandboxes without `runtime` (e.g. "runsc"); "" the engine's default
    docker_runtime: str = ""
    # a docker sandbox's channel: "auto" takes a socket of the daemon's where the engine runs on
    # this machine (faster, see backends/docker/channel_socket.py), else the exec session; "exec"
    # always the exec session
    docker_channel: Literal["auto", "exec"] = "auto"
    # seconds the client has to answer cellbox/approveToolCall; no answer refuses the call
    approval_timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # MCP servers that `cellbox mcp` and `cellbox run` register in their sandboxes, as tables
    # in the `mcpServers` format (`[mcp_servers.time]`, `command = "mcp-server-time"`): mcpconfig.py
    mcp_servers: dict[str, Any] = msgspec.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Settings with every place resolved, once, when the daemon knows all it will be told
    (after `initialize`); nothing reads settings before."""

    settings: Settings
    data_path: Path
    cache_path: Path
    log_path: Path
    runtime_path: Path

    @property
    def sandboxes_path(self) -> Path:
        """One folder per sandbox of every daemon of this user."""
        return self.data_path / "sandboxes"


def resolve(settings: Settings) -> Resolved:
    return Resolved(
        settings=settings,
        data_path=Path(settings.data_dir or platformdirs.user_data_dir(APP)),
        cache_path=cache_path(settings),
        log_path=log_path(settings),
        runtime_path=_runtime_path(settings.runtime_dir),
    )


def cache_path(settings: Settings) -> Path:
    return Path(settings.cache_dir or platformdirs.user_cache_dir(APP))


def log_path(settings: Settings) -> Path:
    return Path(settings.log_dir or platformdirs.user_log_dir(APP))


def _runtime_path(configured: str) -> Path:
    """A private folder for local kernels' sockets: the platformdirs runtime dir, else one in
    the temp dir; short, as a socket's path must stay under 108 bytes."""
    candidates = [configured] if configured else []
    with warnings.catch_warnings(action="ignore"):  # no XDG_RUNTIME_DIR: platformdirs warns
        candidates.append(platformdirs.user_runtime_dir(APP))
    candidates.append(os.path.join(tempfile.gettempdir(), f"{APP}-{os.getuid()}"))
    for candidate in candidates:
        path = Path(candidate)
        if len(str(path)) > 64:
            continue
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)
        except OSError:
            continue
        return path
    raise ConfigError(f"no usable folder for kernel sockets among {candidates}; set runtime_dir")


class ConfigError(Exception):
    """The config file or an environment variable holds a value cellbox cannot use."""


_ENV = {
    "CELLBOX_DEFAULT_BACKEND": "default_backend",
    "CELLBOX_LOG_LEVEL": "log_level",
    "CELLBOX_DATA_DIR": "data_dir",
    "CELLBOX_CACHE_DIR": "cache_dir",
    "CELLBOX_LOG_DIR": "log_dir",
    "CELLBOX_RUNTIME_DIR": "runtime_dir",
    "CELLBOX_TEXT_CAP": "text_cap",
    "CELLBOX_INTERRUPT_GRACE": "interrupt_grace",
    "CELLBOX_KERNEL_START_TIMEOUT": "kernel_start_timeout",
    "CELLBOX_INSTALLER": "installer",
    "CELLBOX_FILE_CAP": "file_cap",
    "CELLBOX_READ_ONLY_ROOT": "read_only_root",
    "CELLBOX_TMP_SIZE_MB": "tmp_size_mb",
    "CELLBOX_DOCKER_RUNTIME": "docker_runtime",
    "CELLBOX_DOCKER_CHANNEL": "docker_channel",
    "CELLBOX_APPROVAL_TIMEOUT": "approval_timeout",
}
_LIMITS_ENV = {"CELLBOX_MEMORY_MB": "memory_mb", "CELLBOX_CPUS": "cpus", "CELLBOX_PIDS": "pids"}


def parse_pool(text: str) -> list[dict[str, Any]]:
    """`CELLBOX_POOL`: comma-separated `BACKEND[:IMAGE]=SIZE`, e.g. `local=2,docker:basic=1`."""
    specs: list[dict[str, Any]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, size = item.rpartition("=")
        if not sep or not size.strip().isdigit():
            raise ConfigError(f"CELLBOX_POOL: {item!r} is not BACKEND[:IMAGE]=SIZE (e.g. local=2)")
        backend, _, image = kind.strip().partition(":")
        spec: dict[str, Any] = {"backend": backend, "size": int(size)}
        if image:
            spec["image"] = image
        specs.append(spec)
    return specs


def config_file() -> Path:
    return Path(os.environ.get("CELLBOX_CONFIG") or Path(platformdirs.user_config_dir(APP)) / "config.toml")


def load_settings(**overrides: Any) -> Settings:
    """Defaults < config file < environment < `overrides` (values of None are skipped)."""
    values: dict[str, Any] = {}
    path = config_file()
    if path.is_file():
        try:
            values.update(msgspec.toml.decode(path.read_bytes()))
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for var, field in _ENV.items():
        if (value := os.environ.get(var)) is not None and value != "":
            values[field] = value
    for var, field in _LIMITS_ENV.items():
        if (value := os.environ.get(var)) is not None and value != "":
            values.setdefault("limits", {})[field] = value
    if pool := os.environ.get("CELLBOX_POOL"):
        values["pool"] = parse_pool(pool)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        # strict=False: numbers given as environment strings are accepted
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc} (config file {path}, or a CELLBOX_* variable)") from exc
