"""The `local` backend: kernels as processes on this machine. It isolates nothing.

Each sandbox gets a folder under the data dir with a workspace (the kernels' cwd, `skills/`
on PYTHONPATH, `images/`) and a virtual environment of its own for packages installed at
runtime. The environment sees the daemon's packages (ipykernel among them) through a `.pth`
file, so it costs a few milliseconds to make and `installPackage` never touches the daemon's
own environment or another sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import site
import sys
import sysconfig
import venv
from pathlib import Path
from typing import BinaryIO

from cellboxd.backends.base import KernelLaunch, OnLine, RunResult, kernel_manager
from cellboxd.inventory import SOCKETS_LINK

_LINE_LIMIT = 1 << 20  # bytes of one output line passed to `on_line`
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


def _daemon_site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


class LocalSandbox:
    def __init__(self, root: Path, env: dict[str, str], sockets: Path) -> None:
        self.root = root
        self._user_env = env
        self._sockets = sockets
        self._venv = root / "venv"
        self._procs: set[asyncio.subprocess.Process] = set()
        self._logs: list[BinaryIO] = []

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def python(self) -> str:
        return str(self._venv / "bin" / "python")

    @property
    def uv(self) -> str | None:
        return shutil.which("uv")

    def release_kernel(self, kernel_id: str) -> None:
        pass

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self._venv / "lib" / version / "site-packages"

    @classmethod
    def create(cls, root: Path, env: dict[str, str], sockets: Path) -> LocalSandbox:
        """A sandbox in `root`; `sockets` is a new folder for its kernels' IPC sockets, short and
        private (`runtime_dir/<sandbox id>`), removed with the sandbox, or by the sweep of orphans,
        which finds it through the `sockets` link in `root`."""
        sockets.mkdir(mode=0o700)
        (root / SOCKETS_LINK).symlink_to(sockets, target_is_directory=True)
        sandbox = cls(root, env, sockets)
        for sub in ("skills", "images"):
            (sandbox.workspace / sub).mkdir(parents=True, exist_ok=True)
        (root / "kernels").mkdir(exist_ok=True)
        venv.EnvBuilder(with_pip=False, symlinks=True).create(sandbox._venv)
        lines = "; ".join(f"site.addsitedir({d!r})" for d in _daemon_site_dirs())
        (sandbox.site_packages / "_cellbox_daemon.pth").write_text(f"import site; {lines}\n")
        # `!pip` in a cell installs into this sandbox, like `%pip` does
        pip = sandbox._venv / "bin" / "pip"
        pip.write_text(f'#!/bin/sh\nexec "{sandbox.python}" -m pip "$@"\n')
        pip.chmod(0o755)
        return sandbox

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV and not k.startswith("CELLBOX_")}
        env.update(self._user_env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.workspace / "skills"), self._user_env.get("PYTHONPATH")) if p
        )
        env["VIRTUAL_ENV"] = str(self._venv)
        env["PATH"] = f"{self._venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def kernel_launch(self, kernel_id: str) -> KernelLaunch:
        # IPC sockets in the sandbox's private folder: no TCP ports, and no other user can connect
        credits = self.root / "kernels" / f"{kernel_id}.credits"
        os.mkfifo(credits, 0o600)
        km = kernel_manager(
            self.python,
            "{connection_file}",
            interrupt_mode="signal",
            credits=str(credits),
            transport="ipc",
            ip=str(self._sockets / kernel_id),
            connection_file=str(self.root / "kernels" / f"{kernel_id}.json"),
        )
        log_path = self.root / "kernels" / f"{kernel_id}.log"
        log = log_path.open("ab")
        self._logs.append(log)
        kwargs = {"env": self.environment(), "cwd": str(self.workspace), "stdout": log, "stderr": log}
        return KernelLaunch(km, kwargs, log_path, credits)

    async def run(self, argv: list[str], on_line: OnLine | None = None) -> RunResult:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(),
            cwd=self.workspace,
            start_new_session=True,
            limit=_LINE_LIMIT,
        )
        self._procs.add(proc)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = await asyncio.gather(_collect(proc.stdout, on_line), _collect(proc.stderr, on_line))
            returncode = await proc.wait()
        finally:
            self._procs.discard(proc)
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
        return RunResult(returncode, out, err)

    async def close(self) -> None:
        for proc in list(self._procs):
            _kill(proc)
        for log in self._logs:
            log.close()
        await asyncio.to_thread(shutil.rmtree, self._sockets, ignore_errors=True)
        await asyncio.to_thread(shutil.rmtree, self.root, ignore_errors=True)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _collect(stream: asyncio.StreamReader, on_line: OnLine | None) -> str:
    if on_line is None:
        return (await stream.read()).decode(errors="replace")
    chunks: list[str] = []
    while line := await stream.readline():
        text = line.decode(errors="replace")
        chunks.append(text)
        if on_line is not None:
            on_line(text.rstrip("\n"))
    return "".join(chunks)
