"""The docker backend against a real engine, through a real daemon over stdio."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from cellboxd.backends.docker import SOCKETS
from tests.rpc import Daemon

pytestmark = pytest.mark.usefixtures("docker_engine")

EXECUTE = "cellbox/execute"


def _containers(sandbox_id: str | None = None) -> list:
    label = "cellbox.sandbox" + (f"={sandbox_id}" if sandbox_id else "")
    return docker.from_env().containers.list(all=True, filters={"label": label})


def _kernel_files(kernel: str) -> list[str]:
    """What a kernel has in its sandbox's sockets folder: five sockets and its credits FIFO."""
    return sorted([*(f"{kernel}-{n}" for n in range(1, 6)), f"{kernel}.credits"])


def _sockets(container: Any) -> dict[str, Any]:
    """The bind mount of a sandbox container's folder of kernel sockets."""
    (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == SOCKETS]
    return mount


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
    # kernels are reached through IPC sockets in a bind-mounted folder: nothing is published
    assert not config["PortBindings"] and not container.attrs["NetworkSettings"]["Ports"]
    sockets = _sockets(container)
    assert sockets["Type"] == "bind" and sockets["RW"]
    folder = Path(sockets["Source"])
    assert folder.name == box["sandboxId"] and len(str(folder)) < 80  # socket paths stay < 108 bytes
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in folder.iterdir()) == _kernel_files(box["kernel"])
    assert all(p.is_socket() for p in folder.glob("*-[0-9]"))
    assert (folder / f"{box['kernel']}.credits").is_fifo()
    # the kernel reads its credits from the FIFO through the mount (it prints no faster than its reader)
    code = "import glob, os; print(*(os.path.realpath(f) for f in glob.glob('/proc/self/fd/*')))"
    assert f"{SOCKETS}/{box['kernel']}.credits" in run(dd, box["kernel"], code)["text"].split()
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
    # no fixed number of kernels: 10 at once (there were 8 slots of published ports)
    others = [dd.start("cellbox/startKernel", {"sandboxId": box["sandboxId"]}) for _ in range(9)]
    others = [dd.response(msg_id, timeout=180)["result"]["kernelId"] for msg_id in others]
    run(dd, box["kernel"], "open('shared.txt', 'w').write('from the first')")
    for other in others:
        assert run(dd, other, "open('shared.txt').read()")["text"] == "'from the first'\n"
    (container,) = _containers(box["sandboxId"])
    folder = Path(_sockets(container)["Source"])
    assert len(list(folder.iterdir())) == 6 * 10
    for other in others:
        dd.request("cellbox/shutdownKernel", {"kernelId": other})
    # a kernel that is shut down leaves nothing behind
    assert sorted(p.name for p in folder.iterdir()) == _kernel_files(box["kernel"])


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
    (container,) = _containers(created["sandboxId"])
    folder = Path(_sockets(container)["Source"])
    container.kill()
    started = time.monotonic()
    result = dd.response(msg_id, timeout=30)["result"]
    assert result["status"] == "died" and time.monotonic() - started < 10
    assert dd.response(dd.start(EXECUTE, {"kernelId": kernel, "code": "1"}))["error"]["code"] == 1007
    restart = dd.response(dd.start("cellbox/restartKernel", {"kernelId": kernel}), timeout=60)["error"]
    assert restart["code"] == 1007 and "is not running" in restart["message"], restart
    dd.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}, timeout=60)
    assert _containers(created["sandboxId"]) == []
    assert not folder.exists()  # the sockets folder goes with the sandbox


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
    (container,) = _containers(created["sandboxId"])
    folder = Path(_sockets(container)["Source"])
    assert folder.is_dir()
    with Daemon():
        deadline = time.monotonic() + 30
        while _containers(created["sandboxId"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _containers(created["sandboxId"]) == []
    assert not folder.exists()  # and its sockets folder


def test_sockets_of_a_killed_daemon_go_even_when_its_container_went_first() -> None:
    d = Daemon()
    created = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
    d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    (container,) = _containers(created["sandboxId"])
    folder = Path(_sockets(container)["Source"])
    container.remove(force=True)  # e.g. `docker rm` by hand: no container leads to the folder
    assert folder.is_dir()
    with Daemon():
        deadline = time.monotonic() + 30
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not folder.exists()


def test_network_none_cuts_the_sandbox_off_and_kernels_still_work(dd: Daemon) -> None:
    created = dd.request("cellbox/createSandbox", {"backend": "docker", "network": "none"}, timeout=600)
    (container,) = _containers(created["sandboxId"])
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert not container.attrs["HostConfig"]["PortBindings"]
    assert not container.attrs["NetworkSettings"]["Ports"]
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
    # the kernel's sockets are files in a bind mount: streaming, interrupts and restarts need no network
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


@pytest.fixture
def sandbox(box: dict) -> Iterator[Any]:
    """A DockerSandbox made in this process (not through a daemon), of the `box` sandbox's image."""
    from cellbox import types as t
    from cellboxd.backends.docker import DockerSandbox, connect

    home = Path(tempfile.mkdtemp(prefix="cbx-"))
    made = DockerSandbox.create(
        connect(),
        root=home / "root",
        sandbox_id="sb-" + home.name[-8:],
        daemon_id="test_docker",
        image=box["image"],
        params=t.CreateSandboxParams(backend="docker"),
        sockets=home / "s",
    )
    yield made
    with contextlib.suppress(docker.errors.NotFound):
        made._container.remove(force=True)
    shutil.rmtree(home, ignore_errors=True)


def _fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def test_exec_connections_are_closed_at_once(sandbox: Any) -> None:
    """Each `docker exec`, and each call to the engine, frees its connection when it ends, not
    at garbage collection; and none is kept alive in the SDK's pools (one per URL)."""
    gc.disable()  # the SDK's exec streams sit in reference cycles: only closing them frees them
    try:
        assert (await sandbox.run(["true"])).returncode == 0
        before = _fds()
        for _ in range(30):
            result = await sandbox.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert _fds() <= before
    finally:
        gc.enable()
    await sandbox.close()
    assert not sandbox._sockets.exists() and not sandbox.root.exists()


async def test_waiting_for_kernels_holds_no_thread(sandbox: Any) -> None:
    """`wait()` on a kernel in a container holds none of the loop's executor threads."""
    import asyncio

    launch = sandbox.kernel_launch("k-waits")
    km = launch.manager
    await km.start_kernel(**launch.kwargs)
    provisioner = km.provisioner
    assert await provisioner.poll() is None
    waits = [asyncio.create_task(provisioner.wait()) for _ in range(3 * (os.cpu_count() or 1) + 20)]
    await asyncio.sleep(0.2)
    # the default executor has cores + 4 threads: waits that each held one would starve it
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
    assert not any(w.done() for w in waits)
    waits[0].cancel()  # one waiter given up leaves the others waiting
    await asyncio.sleep(0.1)
    assert not any(w.done() for w in waits[1:])
    await km.shutdown_kernel(now=True)
    codes = await asyncio.wait_for(asyncio.gather(*waits[1:]), 10)
    assert len(set(codes)) == 1 and codes[0] is not None and codes[0] != 0  # killed
    assert await provisioner.poll() == codes[0]
    assert await provisioner.wait() == codes[0]
    sandbox.release_kernel("k-waits")
    await sandbox.close()
