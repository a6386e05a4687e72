"""Settings: the TOML file, CELLBOX_* overrides, and where the daemon writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import new_kernel
from tests.rpc import Daemon


def test_config_file_and_environment(
    cellbox_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('text_cap = 5\nlog_level = "debug"\n')
    monkeypatch.setenv("CELLBOX_CONFIG", str(config))
    with Daemon() as d:
        _, kernel = new_kernel(d)
        result = d.request("cellbox/execute", {"kernelId": kernel, "code": "print('0123456789')"})
        assert result["text"] == "01234" and result["truncated"] is True
    # the environment wins over the file
    with Daemon(env={"CELLBOX_TEXT_CAP": "8"}) as d:
        _, kernel = new_kernel(d)
        result = d.request("cellbox/execute", {"kernelId": kernel, "code": "print('0123456789')"})
        assert result["text"] == "01234567"
    log_file = cellbox_home / "log" / "cellboxd.log"
    assert "sandbox" in log_file.read_text()


def test_a_bad_config_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("text_cap = -1\n")
    monkeypatch.setenv("CELLBOX_CONFIG", str(config))
    proc = subprocess.run(
        [sys.executable, "-m", "cellboxd", "serve"], input=b"", capture_output=True, timeout=60
    )
    assert proc.returncode == 2
    assert b"text_cap" in proc.stderr and str(config).encode() in proc.stderr


def test_nothing_is_written_into_the_current_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cellboxd", "run", "-c", "import os; print(len(os.listdir('.')) >= 0)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True\n"
    assert list(tmp_path.iterdir()) == []


def test_generated_code_is_cached_and_a_bad_cache_is_rebuilt(cellbox_home: Path) -> None:
    with Daemon() as d:
        assert d.init_result["serverInfo"]["name"] == "cellbox"
    (cache,) = (cellbox_home / "cache").glob("attrs-*.marshal")
    assert cache.stat().st_size > 100_000
    cache.write_bytes(b"not marshal data")
    with Daemon() as d:
        assert d.request("cellbox/listSandboxes", {})["sandboxes"] == []
    assert cache.stat().st_size > 100_000
