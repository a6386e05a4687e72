"""What the rest of the daemon needs from a backend's sandbox."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

OnLine = Callable[[str], None]


class RunResult(msgspec.Struct):
    returncode: int
    stdout: str
    stderr: str


class KernelLaunch(msgspec.Struct):
    """How to start one kernel: its manager, the arguments for `start_kernel`, its output log."""

    manager: AsyncKernelManager
    kwargs: dict[str, Any]
    log_path: Path


class SandboxRuntime(Protocol):
    """A sandbox as a backend made it."""

    @property
    def workspace(self) -> Path:
        """The host folder that is the kernels' working directory."""
        ...

    @property
    def uv(self) -> str | None:
        """uv for installs, where the sandbox has it; else pip is used."""
        ...

    def release_kernel(self, kernel_id: str) -> None:
        """Forgets a kernel that was shut down."""
        ...

    @property
    def python(self) -> str:
        """The sandbox's interpreter."""
        ...

    def kernel_launch(self, kernel_id: str) -> KernelLaunch:
        """How to start a new kernel in this sandbox."""
        ...

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> RunResult:
        """Runs a command in the sandbox, as its kernels would; `on_line` gets each output line."""
        ...

    async def close(self) -> None:
        """Stops the sandbox's processes and removes what it made."""
        ...


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs under `pid` (a daemon that left sandboxes behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Run in each kernel at start: ipykernel sends what a cell prints every 0.2 s however much
# it is, so a cell that prints fast makes messages of many MB, which the daemon must hold
# whole. Flushing every MiB bounds them, and slows a flooding cell to the pace of its reader.
_BOUNDED_STREAMS = (
    "import sys as _s\n"
    "def _cellbox_bound(stream, limit=1 << 20):\n"
    "    write, count = stream.write, [0]\n"
    "    def bounded(text):\n"
    "        for start in range(0, max(len(text), 1), limit):\n"
    "            piece = text[start : start + limit]\n"
    "            write(piece)\n"
    "            count[0] += len(piece)\n"
    "            if count[0] >= limit:\n"
    "                count[0] = 0\n"
    "                stream.flush()\n"
    "        return len(text)\n"
    "    stream.write = bounded\n"
    "for _stream in (_s.stdout, _s.stderr):\n"
    "    _cellbox_bound(_stream)\n"
    "del _s, _stream, _cellbox_bound"
)


def kernel_manager(
    python: str, kernel_file: str, *, interrupt_mode: str, **kwargs: Any
) -> AsyncKernelManager:
    """A jupyter_client manager for an IPython kernel run by `python`, which reads its
    connection file at `kernel_file` (as the sandbox sees it).

    Completion uses IPython's own completer, which completes the live objects of the kernel's
    namespace (what an editor bound to it wants); jedi's static analysis is slow to start and
    returns nothing with some IPython and jedi versions.
    """
    km = AsyncKernelManager(kernel_name="cellbox", **kwargs)
    km._kernel_spec = KernelSpec(
        argv=[
            python,
            "-m",
            "ipykernel_launcher",
            "-f",
            kernel_file,
            "--IPCompleter.use_jedi=False",
            f"--IPKernelApp.exec_lines={_BOUNDED_STREAMS}",
        ],
        display_name="cellbox",
        language="python",
        interrupt_mode=interrupt_mode,
    )
    return km
