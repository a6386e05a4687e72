"""No kernel process outlives the daemon, however it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import new_kernel, runtime_dir
from tests.rpc import Daemon


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie that its parent has not reaped yet is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kernels_with_pids(d: Daemon, count: int) -> tuple[list[int], list[Path]]:
    pids, workspaces = [], []
    for _ in range(count):
        _, kernel = new_kernel(d)
        result = d.request(
            "cellbox/execute", {"kernelId": kernel, "code": "import os; os.getpid(), os.getcwd()"}
        )
        pid, cwd = eval(result["text"])
        pids.append(pid)
        workspaces.append(Path(cwd))
    # a busy kernel too: teardown must not wait for it
    d.start("cellbox/execute", {"kernelId": kernel, "code": "import time; time.sleep(600)"})
    time.sleep(0.3)
    assert all(_alive(p) for p in pids)
    return pids, workspaces


def _close_stdin(d: Daemon) -> None:
    assert d.proc.stdin is not None
    d.proc.stdin.close()


def _shutdown_exit(d: Daemon) -> None:
    assert d.request("shutdown", timeout=10) is None
    d.notify("exit")


def _shutdown_exit_pipelined(d: Daemon) -> None:
    """`exit` sent right behind `shutdown`: shutdown still finishes, is answered, and the
    daemon exits 0."""
    msg_id = d.start("shutdown")
    d.notify("exit")
    assert d.response(msg_id, timeout=10) == {"jsonrpc": "2.0", "id": msg_id, "result": None}
    assert d.proc.wait(timeout=10) == 0


def _sigterm(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("end", [_close_stdin, _shutdown_exit, _shutdown_exit_pipelined, _sigterm])
def test_every_kernel_is_gone_within_5_s_of_the_daemon_ending(end: Callable[[Daemon], None]) -> None:
    d = Daemon()
    try:
        pids, workspaces = _kernels_with_pids(d, 2)
        started = time.monotonic()
        end(d)
        d.proc.wait(timeout=10)
        assert _wait_gone(pids, within=5 - (time.monotonic() - started)) == []
        assert not any(w.exists() for w in workspaces)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()


def test_kernels_of_a_killed_daemon_exit_and_its_folders_are_swept(cellbox_home: Path) -> None:
    d = Daemon()
    pids, workspaces = _kernels_with_pids(d, 1)
    sockets = [runtime_dir(cellbox_home) / w.parent.name for w in workspaces]
    d.proc.kill()
    d.proc.wait(timeout=10)
    # the agent sees its stdin end and stops its kernels
    assert _wait_gone(pids, within=10) == []
    assert all(w.exists() for w in workspaces) and all(s.is_dir() for s in sockets)
    with Daemon() as successor:
        successor.request("cellbox/createSandbox", {})
        assert not any(w.parent.exists() for w in workspaces)
        assert not any(s.exists() for s in sockets)


_DYING_CLIENT = """
import json, os, sys
from tests.rpc import Daemon
from tests.test_cleanup import _kernels_with_pids
d = Daemon()
pids, _ = _kernels_with_pids(d, 2)
print(json.dumps({"daemon": d.proc.pid, "kernels": pids}), flush=True)
os._exit(0)  # the client dies without a word: both ends of the daemon's pipes close
"""


def test_kernels_are_gone_when_the_client_dies() -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _DYING_CLIENT],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        check=True,
    )
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert _wait_gone([pids["daemon"], *pids["kernels"]], within=5) == []


def _initialized_with(data_dir: Path) -> Daemon:
    """A daemon told its data dir by `initialize`, not by the environment."""
    d = Daemon(initialize=False)
    params = {
        "processId": os.getpid(),
        "capabilities": {},
        "initializationOptions": {"dataDir": str(data_dir)},
    }
    d.request("initialize", params)
    d.notify("initialized", {})
    return d


def test_the_orphans_swept_are_those_of_the_data_dir_initialize_names(tmp_path: Path) -> None:
    """Settings are resolved once `initialize` has said all: the sweep of what a killed daemon
    left looks in the data dir it names, not in the environment's."""
    d = _initialized_with(tmp_path / "data")
    created = d.request("cellbox/createSandbox", {})
    assert Path(created["workspace"]).is_relative_to(tmp_path / "data")
    d.proc.kill()
    d.proc.wait(timeout=10)
    folder = Path(created["workspace"]).parent
    assert folder.is_dir()
    with Daemon():  # the environment's data dir: not that one
        pass
    assert folder.is_dir()
    successor = _initialized_with(tmp_path / "data")
    try:
        successor.request("cellbox/createSandbox", {})  # waits for the sweep
        assert not folder.exists()
    finally:
        successor.close()
