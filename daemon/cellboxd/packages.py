"""Installing packages into a running sandbox with pip (or uv, where it is on PATH).

Packages go into the sandbox's own environment, whose site-packages is already on the
kernels' `sys.path`, so a running kernel imports them at once without a restart.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import OnLine, SandboxRuntime


def installer_command(
    runtime: SandboxRuntime, installer: str, packages: list[str], upgrade: bool
) -> list[str]:
    uv = shutil.which("uv") if installer in ("auto", "uv") else None
    if installer == "uv" and uv is None:
        raise errors.InstallFailed("installer 'uv' is configured but not on PATH", {"log": ""})
    if uv is not None:
        argv = [uv, "pip", "install", "--python", runtime.python]
    else:
        argv = [runtime.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if upgrade:
        argv.append("--upgrade")
    # "--" ends the options: a package string can never be read as a pip option
    return [*argv, "--", *packages]


def _distributions(site_packages: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        name = dist.metadata["Name"]
        if name:
            found[name] = dist.version
    return found


async def install(
    runtime: SandboxRuntime, packages: list[str], *, upgrade: bool, installer: str, on_line: OnLine
) -> list[t.InstalledPackage]:
    """Installs `packages`; returns what was added or changed, with versions."""
    argv = installer_command(runtime, installer, packages, upgrade)
    before = _distributions(runtime.site_packages)
    result = await runtime.run(argv, on_line=on_line)
    if result.returncode != 0:
        log = result.stdout + result.stderr
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
        raise errors.InstallFailed(
            f"installing {' '.join(packages)} failed (exit code {result.returncode}): {last.strip()}",
            {"log": log},
        )
    after = _distributions(runtime.site_packages)
    return [
        t.InstalledPackage(name, version)
        for name, version in sorted(after.items(), key=lambda item: item[0].lower())
        if before.get(name) != version
    ]
