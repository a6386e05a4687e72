"""The docker backend against a real engine, through a real daemon over stdio."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.rpc import Daemon

pytestmark = pytest.mark.usefixtures("docker_engine")

EXECUTE = "cellbox/execute"


def _containers(sandbox_id: str | None = None) -> list:
    label = "cellbox.sandbox" + (f"={sandbox_id}" if sandbox_id else "")
    return docker.from_env().containers.list(all=True, filters={"label": label})


@pytest.fixture(scope="module")
def dd(docker_engine: None) -> Iterator[Daemon]:
    with Daemon() as d:
        yield d


@pytest.fixture(scope="module")
def box(dd: Daemon) -> dict:
    """A docker sandbox from the built-in `minimal` variant (built on first use), with a kernel."""
    created = dd.request(
        "cellbox/createSandbox",
        {"backend": "docker", "env": {"API_KEY": "sk-secret-value"}, "workDoneToken": "create-1"},
        timeout=900,
    )
    kernel = dd.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)["kernelId"]
    return {**created, "kernel": kernel}


def run(d: Daemon, kernel: str, code: str, **params: object) -> dict:
    return d.request(EXECUTE, {"kernelId": kernel, "code": code, **params}, timeout=300)


def test_sandbox_is_a_hardened_labelled_container(dd: Daemon, box: dict) -> None:
    assert box["backend"] == "docker" and box["image"].startswith("cellbox-minimal:")
    progress = [p["value"]["kind"] for p in dd.notes("$/progress") if p["token"] == "create-1"]
    assert progress[0] == "begin" and progress[-1] == "end"
    (container,) = _containers(box["sandboxId"])
    config = container.attrs["HostConfig"]
    assert config["CapDrop"] == ["ALL"] and "no-new-privileges" in config["SecurityOpt"]
    assert container.labels["cellbox.daemon.pid"] == str(dd.proc.pid)
    for bindings in container.attrs["NetworkSettings"]["Ports"].values():
        assert all(b["HostIp"] == "127.0.0.1" for b in bindings or [])
    result = run(dd, box["kernel"], "import os; print(os.getuid() != 0, os.environ['API_KEY'], os.getcwd())")
    assert result["text"] == "True sk-secret-value /workspace\n"
    listed = {s["sandboxId"]: s for s in dd.request("cellbox/listSandboxes", {})["sandboxes"]}
    assert listed[box["sandboxId"]]["image"] == box["image"]


def test_env_values_are_never_logged(dd: Daemon, box: dict, cellbox_home: Path) -> None:
    logs = "".join(dd.stderr_lines) + (cellbox_home / "log" / "cellboxd.log").read_text()
    logs += "".join(n["message"] for n in dd.notes("window/logMessage"))
    assert "sk-secret-value" not in logs


def test_streaming_rich_output_and_workspace_files(dd: Daemon, box: dict) -> None:
    code = (
        "import sys\n"
        "for i in range(3):\n    print(i, flush=True); print('e', file=sys.stderr, flush=True)\n"
        "open('made-inside.txt', 'w').write('hi')\n"
        "from IPython.display import SVG, display\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"/>'))\n"
        "'done'"
    )
    result = run(dd, box["kernel"], code, executionId="dock-1")
    streamed = [(n["stream"], n["text"]) for n in dd.notes("cellbox/output") if n["executionId"] == "dock-1"]
    assert streamed == [("stdout", "0\n"), ("stderr", "e\n"), ("stdout", "1\n"), ("stderr", "e\n"),
                        ("stdout", "2\n"), ("stderr", "e\n")]  # fmt: skip
    assert result["text"].endswith("'done'\n")
    workspace = Path(box["workspace"])
    assert (workspace / "made-inside.txt").read_text() == "hi"
    svg = next(o for o in result["outputs"] if "path" in o)
    assert Path(svg["path"]).parent == workspace / "images" and Path(svg["path"]).read_text().startswith(
        "<svg"
    )


def test_timeout_interrupt_and_restart_in_a_container(dd: Daemon, box: dict) -> None:
    kernel = box["kernel"]
    run(dd, kernel, "kept = 1")
    started = time.monotonic()
    result = run(dd, kernel, "import time\nprint('partial', flush=True)\ntime.sleep(60)", timeout=1.5)
    assert time.monotonic() - started < 2.5
    assert (result["status"], result["text"]) == ("timeout", "partial\n")
    assert run(dd, kernel, "kept")["text"] == "1\n"

    msg_id = dd.start(EXECUTE, {"kernelId": kernel, "code": "import time; time.sleep(60)"})
    time.sleep(1)
    dd.request("cellbox/interruptKernel", {"kernelId": kernel})
    assert dd.response(msg_id, timeout=10)["result"]["error"]["ename"] == "KeyboardInterrupt"

    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    assert run(dd, kernel, "'kept' in globals()")["text"] == "False\n"


def test_several_kernels_share_files_and_packages(dd: Daemon, box: dict) -> None:
    other = dd.request("cellbox/startKernel", {"sandboxId": box["sandboxId"]}, timeout=120)["kernelId"]
    run(dd, box["kernel"], "open('shared.txt', 'w').write('from the first')")
    assert run(dd, other, "open('shared.txt').read()")["text"] == "'from the first'\n"
    dd.request("cellbox/shutdownKernel", {"kernelId": other})


def test_runtime_install_is_importable_at_once_and_skill_sources(dd: Daemon, box: dict) -> None:
    kernel = box["kernel"]
    assert run(dd, kernel, "import tinydb")["status"] == "error"
    installed = dd.request(
        "cellbox/installPackage", {"sandboxId": box["sandboxId"], "packages": ["tinydb==4.8.2"]}, timeout=600
    )["installed"]
    assert {"name": "tinydb", "version": "4.8.2"} in installed
    assert run(dd, kernel, "import tinydb; tinydb.__version__")["text"] == "'4.8.2'\n"
    skill = "import tinydb\n\nprint('top-level code ran')\n\ndef count() -> int:\n    return 1\n"
    (Path(box["workspace"]) / "skills" / "counter.py").write_text(skill)
    sources = dd.request(
        "cellbox/getSkillSources", {"sandboxId": box["sandboxId"], "modules": ["counter", "tinydb.queries"]}
    )
    assert sources["sources"]["counter"] == skill
    assert "class Query" in sources["sources"]["tinydb.queries"]
    missing = dd.response(
        dd.start("cellbox/getSkillSources", {"sandboxId": box["sandboxId"], "modules": ["nah"]})
    )
    assert missing["error"]["code"] == 1006


def test_container_killed_from_outside_gives_died(dd: Daemon) -> None:
    created = dd.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
    kernel = dd.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)["kernelId"]
    msg_id = dd.start(EXECUTE, {"kernelId": kernel, "code": "import time; time.sleep(60)", "timeout": 50})
    time.sleep(1)
    _containers(created["sandboxId"])[0].kill()
    started = time.monotonic()
    result = dd.response(msg_id, timeout=30)["result"]
    assert result["status"] == "died" and time.monotonic() - started < 10
    assert dd.response(dd.start(EXECUTE, {"kernelId": kernel, "code": "1"}))["error"]["code"] == 1007
    dd.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}, timeout=60)
    assert _containers(created["sandboxId"]) == []


def test_memory_limit_kills_the_kernel_not_the_daemon(dd: Daemon) -> None:
    created = dd.request(
        "cellbox/createSandbox",
        {"backend": "docker", "limits": {"memoryMb": 200, "pids": 64, "cpus": 0.5}},
        timeout=600,
    )
    kernel = dd.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)["kernelId"]
    result = run(dd, kernel, "chunks = [bytearray(50 * 1024 * 1024) for _ in range(10)]", timeout=60)
    assert result["status"] == "died"
    (container,) = _containers(created["sandboxId"])
    assert container.attrs["HostConfig"]["Memory"] == 200 * 1024 * 1024
    assert container.attrs["HostConfig"]["PidsLimit"] == 64
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    assert run(dd, kernel, "6 * 7")["text"] == "42\n"
    dd.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}, timeout=60)


def test_read_only_mount(dd: Daemon) -> None:
    # not pytest's tmp_path: its parents are private to root, and the container's user is not root
    tmp_path = Path(tempfile.mkdtemp())
    tmp_path.chmod(0o755)
    (tmp_path / "data.txt").write_text("mounted")
    created = dd.request(
        "cellbox/createSandbox",
        {"backend": "docker", "mounts": [{"source": str(tmp_path), "target": "/data", "readOnly": True}]},
        timeout=600,
    )
    kernel = dd.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)["kernelId"]
    assert run(dd, kernel, "open('/data/data.txt').read()")["text"] == "'mounted'\n"
    assert run(dd, kernel, "open('/data/new.txt', 'w')")["error"]["ename"] == "OSError"
    dd.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}, timeout=60)
    shutil.rmtree(tmp_path)


def test_unknown_image_answers_image_not_found(dd: Daemon) -> None:
    error = dd.response(dd.start("cellbox/createSandbox", {"backend": "docker", "image": "cellbox-nope:1"}))[
        "error"
    ]
    assert error["code"] == 1004 and "cellbox build" in error["message"]


def test_daemon_exit_removes_its_containers() -> None:
    with Daemon() as d:
        created = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
        assert len(_containers(created["sandboxId"])) == 1
        assert d.proc.stdin is not None
        d.proc.stdin.close()
        d.proc.wait(timeout=15)
    assert _containers(created["sandboxId"]) == []


def test_containers_of_a_killed_daemon_are_removed_by_the_next() -> None:
    d = Daemon()
    created = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    assert len(_containers(created["sandboxId"])) == 1
    with Daemon():
        deadline = time.monotonic() + 30
        while _containers(created["sandboxId"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _containers(created["sandboxId"]) == []


def test_network_none_cuts_the_sandbox_off_and_kernels_still_work(dd: Daemon) -> None:
    created = dd.request("cellbox/createSandbox", {"backend": "docker", "network": "none"}, timeout=600)
    (container,) = _containers(created["sandboxId"])
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert container.attrs["NetworkSettings"]["Ports"] in ({}, None)
    kernel = dd.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)["kernelId"]
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', type(exc).__name__)"
    )
    result = run(dd, kernel, code)
    assert result["status"] == "ok" and result["text"].startswith("refused"), result
    # streaming, interrupts and restarts go through the forwarded ports as through published ones
    msg_id = dd.start(
        EXECUTE, {"kernelId": kernel, "code": "import time; print('up', flush=True); time.sleep(60)"}
    )
    time.sleep(1.5)
    dd.request("cellbox/interruptKernel", {"kernelId": kernel})
    assert dd.response(msg_id, timeout=15)["result"]["text"] == "up\n"
    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    assert run(dd, kernel, "sum(range(10))")["text"] == "45\n"
    dd.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}, timeout=60)


def test_pip_in_a_cell_installs_into_the_container(dd: Daemon, box: dict) -> None:
    code = "!pip install --quiet cowsay==6.1\nimport cowsay\ncowsay.__file__"
    result = run(dd, box["kernel"], code)
    assert result["status"] == "ok", result
    assert result["outputs"][-1]["data"]["text/plain"].startswith("'/opt/cellbox/venv/")


SEED_DEPENDENCIES = """\
# what the agent's code needs, in Poetry's format
tinydb = "^4.8"
"""

SEED_SKILL = '''"""Notes in a small JSON database: the skill the model is shown."""

import cowsay
from tinydb import TinyDB


def remember(text: str) -> str:
    TinyDB("notes.json").insert({"text": text})
    return cowsay.get_output_string("cow", text)
'''


def test_the_seed_flow_end_to_end(dd: Daemon) -> None:
    """Build from a dependency file, sandbox with a key, runtime install, skill sources, new kernel."""
    tag = "cellbox-test-seed:1"
    try:
        built = dd.request(
            "cellbox/buildImage",
            {"tag": tag, "dependencies": SEED_DEPENDENCIES, "workDoneToken": "b"},
            timeout=900,
        )
        assert built["tag"] == tag and built["imageId"].startswith("sha256:")
        again = dd.request("cellbox/buildImage", {"tag": tag, "dependencies": SEED_DEPENDENCIES})
        assert again == {**built, "built": False}
        assert tag in [i["tag"] for i in dd.request("cellbox/listImages", {})["images"]]

        created = dd.request(
            "cellbox/createSandbox",
            {"backend": "docker", "image": tag, "env": {"NOTES_API_KEY": "k-123"}},
            timeout=600,
        )
        sandbox = created["sandboxId"]
        assert created["image"] == tag
        installed = dd.request(
            "cellbox/installPackage", {"sandboxId": sandbox, "packages": ["cowsay==6.1"]}, timeout=600
        )
        assert {"name": "cowsay", "version": "6.1"} in installed["installed"]
        (Path(created["workspace"]) / "skills" / "notes.py").write_text(SEED_SKILL)
        sources = dd.request("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["notes"]})
        assert sources["formatted"] == f"```python\n# Module: notes\n\n{SEED_SKILL}\n```"

        kernel = dd.request("cellbox/startKernel", {"sandboxId": sandbox}, timeout=120)["kernelId"]
        result = run(dd, kernel, "import os, notes\nprint(notes.remember(os.environ['NOTES_API_KEY']))")
        assert result["status"] == "ok", result
        assert "k-123" in result["text"] and "^__^" in result["text"]
        assert (Path(created["workspace"]) / "notes.json").exists()
        dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker.from_env().images.remove(tag, force=True)


def _cellbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellboxd", *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_ps_lists_sandboxes_and_prune_removes_orphans() -> None:
    d = Daemon()
    local = d.request("cellbox/createSandbox", {})["sandboxId"]
    container = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)["sandboxId"]
    rows = {line.split()[0]: line.split() for line in _cellbox("ps").stdout.splitlines()[1:]}
    assert rows[local][1:4] == ["local", str(d.proc.pid), "running"]
    assert rows[container][1:4] == ["docker", str(d.proc.pid), "running"]
    assert _cellbox("prune").stdout == ""  # a running daemon's sandboxes stay
    assert {local, container} <= {line.split()[0] for line in _cellbox("ps").stdout.splitlines()[1:]}

    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    assert not {local, container} & {line.split()[0] for line in _cellbox("ps").stdout.splitlines()[1:]}
    orphans = {line.split()[0]: line.split()[3] for line in _cellbox("ps", "--all").stdout.splitlines()[1:]}
    assert orphans[local] == orphans[container] == "orphaned"
    removed = _cellbox("prune").stdout.split()
    assert f"{local}" in removed and f"{container}" in removed
    assert _containers(container) == []
    assert not {local, container} & {
        line.split()[0] for line in _cellbox("ps", "--all").stdout.splitlines()[1:]
    }
