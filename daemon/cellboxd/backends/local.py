"""The `local` backend: the agent and its kernels as processes on this machine. It isolates nothing.

Each sandbox gets a folder under the data dir with a workspace (the kernels' cwd, `skills/`
on PYTHONPATH, `images/`) and a virtual environment of its own for packages installed at
runtime. The environment sees the daemon's packages (ipykernel and pyzmq among them) through a
`.pth` file, so it costs a few milliseconds to make and `installPackage` never touches the
daemon's own environment or another sandbox's. The agent runs as the daemon's child, its
channel on the child's stdin and stdout, and keeps its kernels' IPC sockets in a private
folder of the runtime dir.
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

from cellbox import errors
from cellbox import types as t
from cellboxd import channel as ch
from cellboxd import inventory
from cellboxd.backends.base import Key, OnLine, SandboxRuntime
from cellboxd.config import Resolved

_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
_EXIT_WAIT = 2.0  # seconds an agent gets to stop its kernels once its stdin ended


def daemon_site_dirs() -> list[str]:
    """The daemon's site-packages folders, which sandboxes' environments see (read-only)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def given_fields(params: t.CreateSandboxParams) -> list[str]:
    """The fields of `createSandbox` that make a sandbox isolated (the docker backend's), set."""
    fields = {
        "image": params.image,
        "mounts": params.mounts,
        "limits": params.limits,
        "network": params.network,
        "runtime": params.runtime,
    }
    return [field for field, value in fields.items() if value]


class LocalBackend:
    name: t.Backend = "local"

    def __init__(self, resolved: Resolved) -> None:
        self._resolved = resolved

    @property
    def place(self) -> str:
        return ""

    def available(self) -> bool:
        return True

    def validate(self, params: t.CreateSandboxParams) -> None:
        if given := given_fields(params):
            raise errors.InvalidParams(
                f"Invalid params: `{'`, `'.join(given)}` need the docker backend; the local backend "
                "isolates nothing"
            )

    def pool_key(self, image: str | None) -> Key:
        return (self.name, None)

    async def create(
        self, sandbox_id: str, root: Path, params: t.CreateSandboxParams, on_line: OnLine
    ) -> SandboxRuntime:
        folder = self._resolved.runtime_path / sandbox_id
        return await asyncio.to_thread(self.sandbox_type.create, sandbox_id, root, params.env, folder)

    @property
    def sandbox_type(self) -> type[LocalSandbox]:
        return LocalSandbox

    def entries(self) -> list[inventory.Entry]:
        return inventory.local_sandboxes(self._resolved.sandboxes_path, self.name)

    async def remove_orphans(self) -> list[str]:
        return []  # their folders are all there is (agents die with the daemon), and the sweep removes them


class LocalSandbox(SandboxRuntime):
    def __init__(self, sandbox_id: str, root: Path, env: dict[str, str], folder: Path) -> None:
        super().__init__(sandbox_id)
        self.root = root
        self._user_env = env
        self._folder = folder  # the agent's, for its kernels' sockets
        self._venv = root / "venv"
        self.sandbox_workspace = str(self.workspace)
        self.python = str(self._venv / "bin" / "python")
        self._agent: _AgentProcess | None = None

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def uv(self) -> str | None:
        return shutil.which("uv")

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self._venv / "lib" / version / "site-packages"

    @classmethod
    def create(cls, sandbox_id: str, root: Path, env: dict[str, str], folder: Path) -> LocalSandbox:
        """A sandbox in `root`; `folder`, short and private (`runtime_dir/<sandbox id>`), is for
        its kernels' IPC sockets, and goes with the sandbox or with the sweep of orphans."""
        folder.mkdir(mode=0o700)
        sandbox = cls(sandbox_id, root, env, folder)
        for sub in ("skills", "images"):
            (sandbox.workspace / sub).mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=False, symlinks=True).create(sandbox._venv)
        lines = "; ".join(f"site.addsitedir({d!r})" for d in daemon_site_dirs())
        (sandbox.site_packages / "_cellbox_daemon.pth").write_text(f"import site; {lines}\n")
        # `!pip` in a cell installs into this sandbox, like `%pip` does
        pip = sandbox._venv / "bin" / "pip"
        pip.write_text(f'#!/bin/sh\nexec "{sandbox.python}" -m pip "$@"\n')
        pip.chmod(0o755)
        return sandbox

    def environment(self, inherit: bool = True) -> dict[str, str]:
        """The agent's environment, which its kernels and commands inherit: the daemon's own
        (unless not `inherit`: then only what a program needs) and the sandbox's `env`."""
        if inherit:
            env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV and not k.startswith("CELLBOX_")}
        else:
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": "/tmp",
                "LANG": "C.UTF-8",
                "TMPDIR": "/tmp",
            }
        env.update(self._user_env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.workspace / "skills"), self._user_env.get("PYTHONPATH")) if p
        )
        env["VIRTUAL_ENV"] = str(self._venv)
        env["PATH"] = f"{self._venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    async def _connect(self, channel: ch.Channel) -> None:
        if self._agent is not None:  # gone, or going: its kernels' files go too
            await self._agent.stop()
            await asyncio.to_thread(_empty, self._folder)
        program = ch.program(str(self.workspace), str(self._folder))
        loop = asyncio.get_running_loop()
        _, agent = await loop.subprocess_exec(
            lambda: _AgentProcess(channel),
            *self.agent_command(program),
            env=self.environment(),
            cwd=self.workspace,
            start_new_session=True,
        )
        self._agent = agent
        await channel.start(agent, program)

    def agent_command(self, program: bytes) -> list[str]:
        """The command line that starts the sandbox's agent."""
        return ch.command(self.python, program)

    async def _remove(self) -> None:
        """Stops the agent and removes its folder; the sandbox's own folder is its owner's."""
        if self._agent is not None:
            await self._agent.stop()
        await asyncio.to_thread(shutil.rmtree, self._folder, ignore_errors=True)


class _AgentProcess(ch.ChildLink):
    """The agent as a child process: the channel's link over its stdin and stdout."""

    def __init__(self, channel: ch.Channel) -> None:
        super().__init__()
        self._channel = channel
        self._exited = asyncio.get_running_loop().create_future()

    def received(self, data: bytes) -> None:
        self._channel.feed(data)

    def complained(self, data: bytes) -> None:
        self._channel.complain(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._channel.lost("the agent closed its output")

    def process_exited(self) -> None:
        code = self._transport.get_returncode() if self._transport is not None else None
        self._channel.lost(f"the agent exited with code {code}")
        if not self._exited.done():
            self._exited.set_result(None)

    def close(self) -> None:
        """Ends the agent's stdin: it stops its kernels and exits."""
        if (pipe := self._pipe(0)) is not None:
            pipe.close()

    async def stop(self) -> None:
        """Closes the agent's stdin, waits a moment for it to exit, then kills it."""
        self.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), _EXIT_WAIT)
        if self._transport is not None:
            if not self._exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._transport.get_pid(), signal.SIGKILL)
            self._transport.close()


def _empty(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
