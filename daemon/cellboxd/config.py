"""Settings and where things live.

Settings come, each overriding the one before, from the defaults here, the TOML file
`config.toml` in the platformdirs config dir (or `$CELLBOX_CONFIG`), the `CELLBOX_*`
environment variables, the command line, and `initializationOptions` of `initialize`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import platformdirs

from cellbox import types as t

APP = "cellbox"

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's settings; the TOML file uses these names (snake_case)."""

    default_backend: Literal["local", "docker"] = "local"
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

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir or platformdirs.user_data_dir(APP))

    @property
    def sandboxes_path(self) -> Path:
        """One folder per sandbox of every daemon of this user."""
        return self.data_path / "sandboxes"

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or platformdirs.user_cache_dir(APP))

    @property
    def runtime_path(self) -> Path:
        """A private folder for sockets: the platformdirs runtime dir, else one in the temp dir."""
        candidates = [self.runtime_dir] if self.runtime_dir else []
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

    @property
    def log_path(self) -> Path:
        return Path(self.log_dir or platformdirs.user_log_dir(APP))


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
}


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
    if pool := os.environ.get("CELLBOX_POOL"):
        values["pool"] = parse_pool(pool)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        # strict=False: numbers given as environment strings are accepted
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc} (config file {path}, or a CELLBOX_* variable)") from exc
