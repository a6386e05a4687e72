"""The `bubblewrap` backend: the local backend's sandboxes, each agent and its kernels inside
bubblewrap (`bwrap`, Linux), for isolation without Docker.

A sandbox is laid out as a local one (a workspace and a virtual environment over the daemon's
packages, in its folder of the data dir), and its agent runs under bwrap, which shows it:
- the system's folders (`/usr`, `/lib*`, `/bin`, `/sbin`), the few files of `/etc` that programs
  need, the interpreter's installation and the daemon's site-packages, all read-only;
- its own folder and its agent's socket folder, read-write, at the paths the daemon knows them
  by (so that files, images and skill sources work as on the local backend);
- a private `/tmp`, `/proc` and `/dev`; new PID, IPC, UTS and network namespaces (no network:
  `network: "none"` is its only network), a new session, and nothing of the environment but
  what the sandbox is given.
The user's home, other sandboxes and the rest of the machine are not there. bwrap dies with
the daemon (`--die-with-parent`), and the agent with bwrap.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

from cellbox import errors
from cellbox import types as t
from cellboxd import channel as ch
from cellboxd.backends.local import LocalBackend, LocalSandbox, daemon_site_dirs, given_fields

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# what programs read of /etc: the loader's cache, TLS roots, time zones, users, alternatives
_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/alternatives",
    "/etc/mime.types",
)


@functools.cache
def _problem() -> str | None:
    """Why bwrap cannot make sandboxes here, or None when it can (probed once)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed: install bubblewrap (Debian and Ubuntu: apt install bubblewrap)"
    try:
        probe = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not be run: {exc}"
    if probe.returncode != 0:
        return (
            f"bwrap cannot make namespaces here ({probe.stderr.strip() or probe.returncode}): allow "
            "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or the "
            "AppArmor profile for bwrap on Ubuntu)"
        )
    return None


class BubblewrapBackend(LocalBackend):
    """The local backend's sandboxes, under bwrap."""

    name: t.Backend = "bubblewrap"

    def available(self) -> bool:
        return _problem() is None

    def validate(self, params: t.CreateSandboxParams) -> None:
        if (problem := _problem()) is not None:
            raise errors.BackendUnavailable(f"the bubblewrap backend: {problem}", {"backend": self.name})
        given = [field for field in given_fields(params) if field != "network" or params.network != "none"]
        if given:
            raise errors.InvalidParams(
                f"Invalid params: `{'`, `'.join(given)}` are not taken by the bubblewrap backend, whose "
                'sandboxes have no network (`network: "none"`)'
            )

    @property
    def sandbox_type(self) -> type[LocalSandbox]:
        return BubblewrapSandbox


class BubblewrapSandbox(LocalSandbox):
    def agent_command(self, program: bytes) -> list[str]:
        """The agent's command line under bwrap; its environment is set inside (`--setenv`)."""
        bwrap = shutil.which("bwrap")
        assert bwrap is not None, "validate() checked"
        argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--clearenv"]
        for path in _SYSTEM:
            if os.path.lexists(path):
                # a symlink (`/lib` on merged-/usr systems) is made as one, a folder bound
                argv += (
                    ["--symlink", os.readlink(path), path]
                    if os.path.islink(path)
                    else ["--ro-bind", path, path]
                )
        for path in (*_ETC, sys.base_prefix, sys.prefix, *daemon_site_dirs()):
            if os.path.exists(path) and not path.startswith(_SYSTEM):
                argv += ["--ro-bind", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.root), str(self.root), "--bind", str(self._folder), str(self._folder)]
        argv += ["--remount-ro", "/"]  # the root bwrap made for it, and the folders made in it
        env = self.environment(inherit=False)
        for name, value in env.items():
            argv += ["--setenv", name, value]
        argv += ["--chdir", str(self.workspace), "--", *ch.command(self.python, program)]
        return argv
