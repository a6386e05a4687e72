"""Installing packages into a running sandbox with pip (or uv, where it is on PATH).

Packages go into the sandbox's own environment (a docker sandbox's writable prefix, which
`PIP_PREFIX` names), whose site-packages is already on the kernels' `sys.path`, so a running
kernel imports them at once without a restart. The installer runs in the sandbox, through its
agent.
"""

from __future__ import annotations

import msgspec

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import OnLine, SandboxRuntime

# Runs in the sandbox's interpreter: the distributions it sees, the first of each name (the
# one it imports), as JSON.
_LIST = r"""
import importlib.metadata, json, sys
found = {}
for dist in importlib.metadata.distributions():
    found.setdefault(dist.metadata["Name"], dist.version)
found.pop(None, None)
sys.stdout.write(json.dumps(found))
"""


def installer_command(
    runtime: SandboxRuntime, installer: str, packages: list[str], upgrade: bool
) -> list[str]:
    uv = runtime.uv if installer in ("auto", "uv") else None
    if installer == "uv" and uv is None:
        raise errors.InstallFailed(
            "installer 'uv' is configured but not available in the sandbox", {"log": ""}
        )
    if uv is not None:
        argv = [uv, "pip", "install", "--python", runtime.python]
    else:
        argv = [runtime.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if upgrade:
        argv.append("--upgrade")
    # "--" ends the options: a package string can never be read as a pip option
    return [*argv, "--", *packages]


async def _distributions(runtime: SandboxRuntime) -> dict[str, str]:
    result = await runtime.run([runtime.python, "-c", _LIST])
    try:
        return msgspec.json.decode(result.stdout, type=dict[str, str])
    except msgspec.DecodeError:
        raise errors.InstallFailed(
            f"cannot list the sandbox's packages: {result.stderr.strip()}", {"log": result.stderr}
        ) from None


async def install(
    runtime: SandboxRuntime, packages: list[str], *, upgrade: bool, installer: str, on_line: OnLine
) -> list[t.InstalledPackage]:
    """Installs `packages`; returns what was added or changed, with versions."""
    argv = installer_command(runtime, installer, packages, upgrade)
    before = await _distributions(runtime)
    result = await runtime.run(argv, on_line=on_line)
    if result.returncode != 0:
        log = result.stdout + result.stderr
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
        raise errors.InstallFailed(
            f"installing {' '.join(packages)} failed (exit code {result.returncode}): {last.strip()}",
            {"log": log},
        )
    after = await _distributions(runtime)
    return [
        t.InstalledPackage(name, version)
        for name, version in sorted(after.items(), key=lambda item: item[0].lower())
        if before.get(name) != version
    ]
