"""The bubblewrap backend: kernels isolated without Docker, through the real daemon and bwrap."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.rpc import Daemon

EXECUTE = "cellbox/execute"


@pytest.fixture(scope="module")
def bd(cellbox_home: Path) -> Iterator[Daemon]:
    if shutil.which("bwrap") is None:
        unavailable("bwrap is not installed (apt install bubblewrap)", "CELLBOX_REQUIRE_BUBBLEWRAP")
    with Daemon() as d:
        if "bubblewrap" not in d.init_result["capabilities"]["experimental"]["cellbox"]["backends"]:
            unavailable("bwrap cannot make namespaces on this machine", "CELLBOX_REQUIRE_BUBBLEWRAP")
        yield d


def _new(d: Daemon, **params: object) -> tuple[str, str, str]:
    created = d.request("cellbox/createSandbox", {"backend": "bubblewrap", **params})
    kernel = d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]})["kernelId"]
    return created["sandboxId"], kernel, created["workspace"]


def run(d: Daemon, kernel: str, code: str) -> dict:
    return d.request(EXECUTE, {"kernelId": kernel, "code": code, "timeout": 60})


def test_a_sandbox_sees_neither_the_home_nor_other_sandboxes_nor_a_writable_host(bd: Daemon) -> None:
    secret = Path.home() / ".cellbox-bubblewrap-secret"
    secret.write_text("the user's")
    try:
        _, first, first_workspace = _new(bd)
        _, second, _ = _new(bd)
        code = (
            "import os\n"
            f"print(os.path.exists({str(secret)!r}), os.path.exists({first_workspace!r}))\n"
            "for path in ('/usr/cellbox-x', '/etc/cellbox-x', '/cellbox-x'):\n"
            "    try:\n        open(path, 'w')\n        print('wrote', path)\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "print(os.path.exists('/etc/shadow'), os.getpid() < 10)"
        )
        result = run(bd, second, code)
        assert result["text"] == "False False\nOSError\nOSError\nOSError\nFalse True\n", result
        assert not Path("/etc/cellbox-x").exists()
        # its own workspace is its, and the daemon sees what it writes there
        assert run(bd, first, "open('mine.txt', 'w').write('x')")["status"] == "ok"
        assert (Path(first_workspace) / "mine.txt").read_text() == "x"
    finally:
        secret.unlink()


def test_there_is_no_network_and_connects_fail_at_once(bd: Daemon) -> None:
    _, kernel, _ = _new(bd)
    code = (
        "import socket\nfor address in (('127.0.0.1', 22), ('1.1.1.1', 53)):\n"
        "    try:\n        socket.create_connection(address, timeout=10)\n        print('connected')\n"
        "    except OSError as e:\n        print(type(e).__name__)"
    )
    assert run(bd, kernel, code)["text"] == "ConnectionRefusedError\nOSError\n"


def test_files_skills_and_sources_work_as_on_the_other_backends(bd: Daemon) -> None:
    sandbox, kernel, _ = _new(bd)
    skill = b'"""Weather."""\n\ndef forecast(city: str) -> str:\n    return f"sun in {city}"\n'
    bd.request(
        "cellbox/writeFile",
        {"sandboxId": sandbox, "path": "skills/weather.py", "content": base64.b64encode(skill).decode()},
    )
    sources = bd.request("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["weather"]})
    assert sources["sources"]["weather"] == skill.decode()
    assert run(bd, kernel, "from weather import forecast\nforecast('Oslo')")["text"] == "'sun in Oslo'\n"


def test_what_it_does_not_take_is_refused(bd: Daemon) -> None:
    for params in ({"network": "bridge"}, {"image": "minimal"}, {"limits": {"memoryMb": 100}}):
        answer = bd.response(bd.start("cellbox/createSandbox", {"backend": "bubblewrap", **params}))
        assert answer["error"]["code"] == -32602, answer


def test_a_killed_daemon_leaves_no_process_and_the_next_removes_its_folder(cellbox_home: Path) -> None:
    if shutil.which("bwrap") is None:
        unavailable("bwrap is not installed (apt install bubblewrap)", "CELLBOX_REQUIRE_BUBBLEWRAP")
    d = Daemon()
    sandbox, kernel, workspace = _new(d)
    run(d, kernel, "1")
    root = Path(workspace).parent

    def sandbox_processes() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if sandbox.encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    assert sandbox_processes()
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 20
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []
    assert root.exists()
    with Daemon() as next_daemon:
        next_daemon.request("cellbox/createSandbox", {"backend": "bubblewrap"})  # waits for the sweep
    assert not root.exists()
    subprocess.run(["true"], check=True)
