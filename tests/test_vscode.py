"""The VS Code extension in editors/vscode: installed from its lockfile, type-checked, tested
(its integration tests drive a real daemon of this interpreter), and packaged as a .vsix.

Skips when `npm` is not on PATH, unless CELLBOX_REQUIRE_EDITORS=1 (CI), which fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import unavailable

EXTENSION = Path(__file__).resolve().parent.parent / "editors" / "vscode"


def npm(*args: str) -> None:
    """Runs npm in the extension's folder; a non-zero exit fails the test with npm's output."""
    executable = shutil.which("npm")
    if executable is None:
        reason = "npm is not on PATH: the VS Code extension's tests need Node 20+ and npm"
        unavailable(reason, "CELLBOX_REQUIRE_EDITORS")
    done = subprocess.run(
        [executable, *args],
        cwd=EXTENSION,
        # the integration tests start `$CELLBOX_PYTHON -m cellboxd serve`: this interpreter's daemon
        env={**os.environ, "CELLBOX_PYTHON": sys.executable},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        pytest.fail(f"npm {' '.join(args)} exited {done.returncode}\n{output}")


@pytest.fixture(scope="module")
def installed() -> None:
    """`npm ci`, unless node_modules was installed after package-lock.json last changed."""
    installed_lock = EXTENSION / "node_modules" / ".package-lock.json"
    lock = EXTENSION / "package-lock.json"
    if not (installed_lock.exists() and installed_lock.stat().st_mtime > lock.stat().st_mtime):
        npm("ci")


@pytest.mark.timeout(900)
def test_typecheck(installed: None) -> None:
    npm("run", "typecheck")


@pytest.mark.timeout(900)
def test_unit_and_integration_tests(installed: None) -> None:
    npm("test")


@pytest.mark.timeout(900)
def test_package_makes_a_vsix(installed: None) -> None:
    vsix = EXTENSION / "cellbox.vsix"
    vsix.unlink(missing_ok=True)
    npm("run", "package")
    with zipfile.ZipFile(vsix) as archive:
        names = set(archive.namelist())
    assert {"extension/package.json", "extension/dist/extension.js", "extension/readme.md"} <= names
    assert not any(name.startswith(("extension/node_modules/", "extension/src/")) for name in names)
