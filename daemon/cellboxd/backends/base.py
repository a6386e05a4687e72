"""What the rest of the daemon needs from a backend's sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
from jupyter_client.manager import AsyncKernelManager

OnLine = Callable[[str], None]


class RunResult(msgspec.Struct):
    returncode: int
    stdout: str
    stderr: str


class SandboxRuntime(Protocol):
    """A sandbox as a backend made it."""

    @property
    def workspace(self) -> Path:
        """The host folder that is the kernels' working directory."""
        ...

    @property
    def site_packages(self) -> Path:
        """Where packages installed at runtime go."""
        ...

    @property
    def python(self) -> str:
        """The sandbox's interpreter."""
        ...

    def kernel_manager(self, kernel_id: str) -> tuple[AsyncKernelManager, dict[str, Any]]:
        """A manager for a new kernel, and the keyword arguments to start it with."""
        ...

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> RunResult:
        """Runs a command in the sandbox, as its kernels would; `on_line` gets each output line."""
        ...

    async def close(self) -> None:
        """Stops the sandbox's processes and removes what it made."""
        ...
