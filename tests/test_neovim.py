"""The Neovim plugin's headless test (editors/neovim/tests/run.lua), driving a real daemon.

Skips when `nvim` is not on PATH, unless CELLBOX_REQUIRE_EDITORS=1 (CI), which fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [
    "--headless",
    "--clean",
    "-u",
    "NONE",
    "-c",
    "set rtp+=editors/neovim",
    "-c",
    "luafile editors/neovim/tests/run.lua",
]


def test_neovim_plugin() -> None:
    nvim = shutil.which("nvim")
    if nvim is None:
        reason = "nvim is not on PATH (apt-get install neovim): the Neovim plugin's test needs Neovim 0.7+"
        unavailable(reason, "CELLBOX_REQUIRE_EDITORS")
    # The daemon of this interpreter (run.lua splits the command on spaces).
    env = {**os.environ, "CELLBOX_SERVE": f"{sys.executable} -m cellboxd serve"}
    try:
        proc = subprocess.run(
            [nvim, *COMMAND],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"nvim did not finish within {exc.timeout} s:\n{exc.stdout!r}\n{exc.stderr!r}")
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, f"nvim exited with {proc.returncode}\n{output}"
    assert "cellbox-neovim: " in proc.stdout and " passed" in proc.stdout, output
