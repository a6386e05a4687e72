"""What the rest of the daemon needs from a backend's sandbox."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:  # jupyter_client is imported with the first kernel: the daemon starts faster
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

OnLine = Callable[[str], None]


class RunResult(msgspec.Struct):
    returncode: int
    stdout: str
    stderr: str


class KernelLaunch(msgspec.Struct):
    """How to start one kernel: its manager, the arguments for `start_kernel`, its output log,
    and its credits FIFO on this machine (None: the kernel prints unchecked)."""

    manager: AsyncKernelManager
    kwargs: dict[str, Any]
    log_path: Path
    credits: Path | None = None


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


async def process_exit(provisioner: KernelProvisionerBase) -> int | None:
    """Waits until a kernel's process has ended; its exit code.

    A local process is watched through a pidfd, which wakes the loop the moment it exits and
    costs nothing until then; other provisioners wait in their own way.
    """
    from jupyter_client.provisioning.local_provisioner import LocalProvisioner

    process = getattr(provisioner, "process", None)
    if not isinstance(provisioner, LocalProvisioner) or process is None:
        return await provisioner.wait()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux, or the process is already reaped
        return await provisioner.wait()
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await ended
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return await provisioner.poll()


# Run in each kernel at start. ipykernel sends what a cell prints every 0.2 s however much it
# is, so a cell that prints fast makes messages of many MB; and nothing stops a kernel from
# printing faster than the daemon's client reads, zmq queueing the difference in the daemon.
# So every MiB a kernel writes is flushed as one message and needs a credit: a byte the daemon
# writes into the kernel's credits FIFO once its client has taken a MiB (see Kernel). A kernel
# may be CREDITS_AHEAD MiB ahead; then `print` waits for its reader, as on a terminal. A FIFO
# that cannot be opened, or that ends (the daemon is gone), stops the waiting. The wrapper is
# put back before every cell: IPython 9 restores `sys.stdout.write` after each one.
CREDIT_CHARS = 1 << 20
CREDITS_AHEAD = 8
_BOUNDED_STREAMS = """\
def _cellbox_bound(path, limit={limit}, ahead={ahead}):
    import os as _o, sys as _s
    fd = [None, ahead, 0]  # the FIFO, credits in hand, characters since the last credit
    if path:
        try:
            fd[0] = _o.open(path, _o.O_RDONLY | _o.O_NONBLOCK)
            _o.set_blocking(fd[0], True)
        except OSError:
            pass
    def credit():
        if fd[1]:
            fd[1] -= 1
        elif fd[0] is not None and not _o.read(fd[0], 1):
            _o.close(fd[0])
            fd[0] = None
    def bound(stream):
        write = stream.write
        if getattr(write, "_cellbox", False):
            return
        def bounded(text):
            for start in range(0, max(len(text), 1), limit):
                piece = text[start : start + limit]
                write(piece)
                fd[2] += len(piece)
                while fd[2] >= limit:
                    fd[2] -= limit
                    stream.flush()
                    credit()
            return len(text)
        bounded._cellbox = True
        stream.write = bounded
    def bound_both(*_):
        bound(_s.stdout)
        bound(_s.stderr)
    bound_both()
    get_ipython().events.register("pre_execute", bound_both)
_cellbox_bound({path!r})
del _cellbox_bound"""


def kernel_manager(
    python: str, kernel_file: str, *, interrupt_mode: str, credits: str | None = None, **kwargs: Any
) -> AsyncKernelManager:
    """A jupyter_client manager for an IPython kernel run by `python`, which reads its
    connection file at `kernel_file` and its credits FIFO at `credits` (as the sandbox sees them).

    Completion uses IPython's own completer, which completes the live objects of the kernel's
    namespace (what an editor bound to it wants); jedi's static analysis is slow to start and
    returns nothing with some IPython and jedi versions.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name="cellbox", **kwargs)
    km._kernel_spec = KernelSpec(
        argv=[
            python,
            "-m",
            "ipykernel_launcher",
            "-f",
            kernel_file,
            "--IPCompleter.use_jedi=False",
            "--IPKernelApp.exec_lines="
            + _BOUNDED_STREAMS.format(limit=CREDIT_CHARS, ahead=CREDITS_AHEAD, path=credits),
        ],
        display_name="cellbox",
        language="python",
        interrupt_mode=interrupt_mode,
    )
    return km
