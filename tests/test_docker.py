"""The docker backend on every engine users reach (tests/engines.py), through a real daemon.

Each test runs once per engine: Docker Engine on this machine, a remote engine over tcp:// and
ssh://, Docker Desktop's shape, Podman as root and rootless, and gVisor's runsc. The daemon and
a sandbox meet only through the engine's API, so the same tests hold on each.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.engines import ENGINES, SHARED, Engine, engine
from tests.rpc import Daemon

EXECUTE = "cellbox/execute"


@pytest.fixture(scope="module", params=list(ENGINES))
def eng(request: pytest.FixtureRequest) -> Engine:
    return engine(request.param)


@pytest.fixture(scope="module")
def client(eng: Engine) -> Iterator[docker.DockerClient]:
    made = eng.client()
    yield made
    made.close()


@pytest.fixture(scope="module")
def dd(eng: Engine) -> Iterator[Daemon]:
    # a grace that a loaded machine's slowest runtime (gVisor on ptrace) meets: these tests check
    # that a timeout keeps the kernel's state; the restart past the grace is test_execute's
    with Daemon(env={"CELLBOX_INTERRUPT_GRACE": "10", **eng.env}) as d:
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


def _containers(client: docker.DockerClient, sandbox_id: str | None = None, sparse: bool = False) -> list:
    """The sandbox's containers; `sparse` ones are not inspected, so that one removed meanwhile
    is not an error (Podman answers 500 for it, not 404)."""
    label = "cellbox.sandbox" + (f"={sandbox_id}" if sandbox_id else "")
    return client.containers.list(all=True, filters={"label": label}, sparse=sparse)


def run(d: Daemon, kernel: str, code: str, **params: object) -> dict:
    return d.request(EXECUTE, {"kernelId": kernel, "code": code, **params}, timeout=300)


def _new(d: Daemon, **params: object) -> tuple[str, str]:
    sandbox = d.request("cellbox/createSandbox", {"backend": "docker", **params}, timeout=600)["sandboxId"]
    kernel = d.request("cellbox/startKernel", {"sandboxId": sandbox}, timeout=120)["kernelId"]
    return sandbox, kernel


def _sleep(d: Daemon, kernel: str, execution_id: str) -> int:
    """Starts an execute that prints `up` and sleeps; returns once `up` arrived."""
    code = "import time; print('up', flush=True); time.sleep(60)"
    msg_id = d.start(EXECUTE, {"kernelId": kernel, "code": code, "executionId": execution_id})
    d.wait_for("cellbox/output", lambda n: n["executionId"] == execution_id, timeout=60)
    return msg_id


def _read(d: Daemon, sandbox: str, path: str) -> bytes:
    return base64.b64decode(d.request("cellbox/readFile", {"sandboxId": sandbox, "path": path})["content"])


def _write(d: Daemon, sandbox: str, path: str, content: bytes) -> dict:
    params = {"sandboxId": sandbox, "path": path, "content": base64.b64encode(content).decode()}
    return d.request("cellbox/writeFile", params)


def test_sandbox_is_a_hardened_labelled_container(
    eng: Engine, client: docker.DockerClient, dd: Daemon, box: dict
) -> None:
    assert box["backend"] == "docker" and box["image"].startswith("cellbox-minimal:")
    assert "workspace" not in box and box["sandboxWorkspace"] == "/workspace"  # not on this machine
    progress = [p["value"]["kind"] for p in dd.notes("$/progress") if p["token"] == "create-1"]
    assert progress[0] == "begin" and progress[-1] == "end"
    (container,) = _containers(client, box["sandboxId"])
    config = container.attrs["HostConfig"]
    assert "no-new-privileges" in config["SecurityOpt"]
    assert config["ReadonlyRootfs"] is True and "/tmp" in (config.get("Tmpfs") or {})
    assert container.labels["cellbox.daemon.pid"] == str(dd.proc.pid)
    # the workspace, packages and home are engine volumes; of the daemon's machine there is at
    # most its socket's folder, read-only, where the engine runs on this machine
    mounts = {m["Destination"]: (m["Type"], m["RW"]) for m in container.attrs["Mounts"]}
    volumes = {path: ("volume", True) for path in ("/workspace", "/opt/cellbox/packages", "/home/cellbox")}
    assert mounts == {**volumes, **({"/run/cellbox": ("bind", False)} if eng.socket_channel else {})}
    assert not config.get("PortBindings") and not container.attrs["NetworkSettings"].get("Ports")
    if eng.enforces_limits:  # the defaults: a sandbox without `limits` is limited too
        assert (
            config["Memory"] == 2048 << 20 and config["PidsLimit"] == 512 and config["NanoCpus"] == 2 * 10**9
        )
    if eng.runtime:
        assert config["Runtime"] == eng.runtime
    code = (
        "import os, subprocess\n"
        "print(os.getuid() != 0, os.environ['API_KEY'], os.getcwd())\n"
        "caps = dict(line.split(':') for line in open('/proc/self/status') if line.startswith('Cap'))\n"
        "print({name: int(value, 16) for name, value in caps.items() if name != 'CapAmb'})\n"
        "import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))\n"  # PR_GET_NO_NEW_PRIVS
        "for path in ('/opt/cellbox/x', '/tmp/x', os.path.expanduser('~/x'), 'x'):\n"
        "    try:\n        open(path, 'w').close(); print('writable', path)\n"
        "    except OSError as exc:\n        print('refused', path, exc.errno)\n"
        "print(subprocess.run(['find', '/', '-xdev', '-type', 'f', '-perm', '/6000'],"
        " capture_output=True, text=True).stdout or 'no setuid')"
    )
    result = run(dd, box["kernel"], code)
    assert result["text"].splitlines() == [
        "True sk-secret-value /workspace",
        "{'CapInh': 0, 'CapPrm': 0, 'CapEff': 0, 'CapBnd': 0}",  # every capability dropped
        "1",  # no new privileges
        "refused /opt/cellbox/x 30",  # EROFS: the root file system is read-only (the user owns it)
        "writable /tmp/x",
        "writable /home/cellbox/x",
        "writable x",
        "no setuid",
    ], result
    listed = {s["sandboxId"]: s for s in dd.request("cellbox/listSandboxes", {})["sandboxes"]}
    assert listed[box["sandboxId"]]["image"] == box["image"]
    # the agent says which way it speaks to the daemon, and the daemon logs it
    via = "the daemon's socket" if eng.socket_channel else "the exec session"
    assert any(f"{box['sandboxId']}: the agent's channel is {via}" in line for line in dd.stderr_lines)


def test_the_daemons_socket_takes_its_agent_and_nothing_else(eng: Engine, dd: Daemon) -> None:
    """Code in a sandbox can reach the daemon's socket: while no agent starts, nothing it sends
    there (no token, a forged one, junk without end) is even read; connections it holds while a
    new agent starts do not keep that agent out; and it can neither replace the socket nor put
    anything beside it."""
    if not eng.socket_channel:
        pytest.skip("no socket of the daemon's on this engine: the channel is the exec session")
    sandbox, kernel = _new(dd)
    code = (
        "import socket\n"
        "answers = []\n"
        "for payload in (b'', b'forged-token\\n' + b'\\0' * 4096, b'x' * 100000, b'\\n' * 3):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.settimeout(2)\n"
        "    try:\n"
        "        s.connect('/run/cellbox/channel.sock')\n"
        "        s.sendall(payload)\n"
        "        answers.append(s.recv(10))\n"
        "    except OSError as exc:\n"
        "        answers.append(type(exc).__name__)\n"
        "import os\n"
        "attempts = (lambda: open('/run/cellbox/x', 'w'), lambda: os.remove('/run/cellbox/channel.sock'))\n"
        "for attempt in attempts:\n"
        "    try:\n        attempt()\n    except OSError as exc:\n        answers.append(exc.errno)\n"
        "answers"
    )
    assert run(dd, kernel, code, timeout=60)["text"] in (
        "['TimeoutError', 'TimeoutError', 'TimeoutError', 'TimeoutError', 30, 30]\n",
        "['TimeoutError', 'TimeoutError', 'TimeoutError', 'TimeoutError', 30, 13]\n",
    )
    # a process of the sandbox's, which outlives the agent, fills the socket's backlog
    holder = (
        "import socket, time\n"
        "held = []\n"
        "for _ in range(20):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.settimeout(1)\n"
        "    try:\n        s.connect('/run/cellbox/channel.sock')\n        held.append(s)\n"
        "    except OSError:\n        pass\n"
        "print(len(held), flush=True)\n"
        "time.sleep(600)\n"
    )
    spawn = (
        "import subprocess, sys\n"
        f"holder = subprocess.Popen([sys.executable, '-c', {holder!r}], stdout=-1)\n"
        "int(holder.stdout.readline())"
    )
    assert int(run(dd, kernel, spawn, timeout=60)["text"]) > 0
    run(dd, kernel, "import os, signal; os.kill(os.getppid(), signal.SIGKILL)")
    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)  # a new agent
    assert run(dd, kernel, "6 * 7")["text"] == "42\n"
    line = f"{sandbox}: the agent's channel is the daemon's socket"
    assert sum(line in logged for logged in dd.stderr_lines) == 2
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)


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
    assert _read(dd, box["sandboxId"], "made-inside.txt") == b"hi"
    (svg,) = [o for o in result["outputs"] if "file" in o]
    # saved in the sandbox, named by the kernel (never the client's executionId); no host path
    assert (
        "path" not in svg
        and svg["file"].startswith(f"images/{box['kernel']}-")
        and "dock-1" not in svg["file"]
    )
    assert _read(dd, box["sandboxId"], svg["file"]).startswith(b"<svg")
    displays = [n for n in dd.notes("cellbox/display") if n["executionId"] == "dock-1"]
    assert [(n.get("file"), "path" in n) for n in displays] == [(svg["file"], False), (None, False)]


def test_timeout_interrupt_and_restart_in_a_container(dd: Daemon, box: dict) -> None:
    kernel = box["kernel"]
    run(dd, kernel, "kept = 1")
    started = time.monotonic()
    result = run(dd, kernel, "import time\nprint('partial', flush=True)\ntime.sleep(60)", timeout=1.5)
    assert time.monotonic() - started < 3
    assert (result["status"], result["text"]) == ("timeout", "partial\n")
    assert run(dd, kernel, "kept")["text"] == "1\n"

    msg_id = _sleep(dd, kernel, "interrupted")
    dd.request("cellbox/interruptKernel", {"kernelId": kernel})
    assert dd.response(msg_id, timeout=10)["result"]["error"]["ename"] == "KeyboardInterrupt"

    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    assert run(dd, kernel, "'kept' in globals()")["text"] == "False\n"


def test_several_kernels_share_files_and_packages(dd: Daemon, box: dict) -> None:
    others = [dd.start("cellbox/startKernel", {"sandboxId": box["sandboxId"]}) for _ in range(5)]
    others = [dd.response(msg_id, timeout=180)["result"]["kernelId"] for msg_id in others]
    run(dd, box["kernel"], "open('shared.txt', 'w').write('from the first')")
    for other in others:
        assert run(dd, other, "open('shared.txt').read()")["text"] == "'from the first'\n"
    for other in others:
        dd.request("cellbox/shutdownKernel", {"kernelId": other})
    assert run(dd, box["kernel"], "6 * 7")["text"] == "42\n"


def test_runtime_install_is_importable_at_once_and_skill_sources(dd: Daemon, box: dict) -> None:
    kernel, sandbox = box["kernel"], box["sandboxId"]
    assert run(dd, kernel, "import tinydb")["status"] == "error"
    installed = dd.request(
        "cellbox/installPackage", {"sandboxId": sandbox, "packages": ["tinydb==4.8.2"]}, timeout=600
    )["installed"]
    assert {"name": "tinydb", "version": "4.8.2"} in installed
    # into the sandbox's own writable storage: its root file system is read-only
    assert run(dd, kernel, "import tinydb; tinydb.__file__")["text"].startswith("'/opt/cellbox/packages/")
    skill = "import tinydb\n\nprint('top-level code ran')\n\ndef count() -> int:\n    return 1\n"
    assert _write(dd, sandbox, "skills/counter.py", skill.encode()) == {"size": len(skill)}
    sources = dd.request(
        "cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["counter", "tinydb.queries"]}
    )
    assert sources["sources"]["counter"] == skill
    assert "class Query" in sources["sources"]["tinydb.queries"]
    missing = dd.response(dd.start("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["nah"]}))
    assert missing["error"]["code"] == 1006


def test_pip_in_a_cell_installs_into_the_sandbox(dd: Daemon, box: dict) -> None:
    code = "!pip install --quiet cowsay==6.1\nimport cowsay\ncowsay.__file__"
    result = run(dd, box["kernel"], code)
    assert result["status"] == "ok", result
    assert result["outputs"][-1]["data"]["text/plain"].startswith("'/opt/cellbox/packages/")


def test_container_killed_from_outside_gives_died(client: docker.DockerClient, dd: Daemon) -> None:
    sandbox, kernel = _new(dd)
    msg_id = _sleep(dd, kernel, f"killed-{sandbox}")
    (container,) = _containers(client, sandbox)
    container.kill()
    started = time.monotonic()
    result = dd.response(msg_id, timeout=30)["result"]
    assert result["status"] == "died" and time.monotonic() - started < 10
    assert dd.response(dd.start(EXECUTE, {"kernelId": kernel, "code": "1"}))["error"]["code"] == 1007
    restart = dd.response(dd.start("cellbox/restartKernel", {"kernelId": kernel}), timeout=60)["error"]
    assert restart["code"] == 1007 and "not running" in restart["message"], restart
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)
    assert _containers(client, sandbox, sparse=True) == []


def test_a_cell_that_kills_the_agent_loses_its_kernel_not_its_sandbox(dd: Daemon) -> None:
    sandbox, kernel = _new(dd)
    _write(dd, sandbox, "kept.txt", b"still here")
    # the kernel's parent is the agent, which acts with the sandbox's rights and so is the cell's
    result = run(
        dd, kernel, "import os, signal; os.kill(os.getppid(), signal.SIGKILL); import time; time.sleep(30)"
    )
    assert result["status"] == "died"
    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)  # a new agent
    assert run(dd, kernel, "open('kept.txt').read()")["text"] == "'still here'\n"
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)


def test_limits_kill_the_kernel_not_the_daemon(eng: Engine, client: docker.DockerClient, dd: Daemon) -> None:
    # gVisor's own threads (its sentry, a gofer per mount) count against the pids limit too
    pids = 256 if eng.runtime == "runsc" else 64
    limits = {"memoryMb": 200, "pids": pids, "cpus": 0.5}
    if not eng.enforces_limits:
        error = dd.response(
            dd.start("cellbox/createSandbox", {"backend": "docker", "limits": limits}), timeout=600
        )
        assert error["error"]["code"] == -32602 and "limits.memoryMb" in error["error"]["message"], error
        return
    sandbox, kernel = _new(dd, limits=limits)
    (container,) = _containers(client, sandbox)
    config = container.attrs["HostConfig"]
    assert (config["Memory"], config["PidsLimit"], config["NanoCpus"]) == (200 << 20, pids, 500_000_000)
    result = run(dd, kernel, "chunks = [bytearray(50 * 1024 * 1024) for _ in range(10)]", timeout=60)
    assert result["status"] == "died"
    if eng.runtime == "runsc":
        # gVisor's kernel runs in the container's cgroup: the limit stops the whole sandbox
        assert "container stopped" in result["error"]["evalue"], result
        restart = dd.response(dd.start("cellbox/restartKernel", {"kernelId": kernel}), timeout=60)
        assert restart["error"]["code"] == 1007 and "not running" in restart["error"]["message"]
        dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)
        sandbox, kernel = _new(dd, limits=limits)
    else:
        dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    fork_bomb = (
        "import os, time\nwhile True:\n    try:\n        os.fork() or (time.sleep(30), os._exit(0))\n"
        "    except OSError:\n        break\n'bounded'"
    )
    assert run(dd, kernel, "6 * 7")["text"] == "42\n"
    assert run(dd, kernel, fork_bomb, timeout=60)["status"] in ("ok", "died")
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)


def test_read_only_mount_of_a_shared_folder(eng: Engine, dd: Daemon) -> None:
    if eng.name == "local":
        os.makedirs(SHARED, exist_ok=True)  # the other engines' machines share it (tests/engines/up)
    folder = Path(tempfile.mkdtemp(dir=SHARED))
    folder.chmod(0o755)
    (folder / "data.txt").write_text("mounted")
    (folder / "data.txt").chmod(0o644)
    mounts = [{"source": str(folder), "target": "/data", "readOnly": True}]
    sandbox, kernel = _new(dd, mounts=mounts)
    assert run(dd, kernel, "open('/data/data.txt').read()")["text"] == "'mounted'\n"
    # EROFS, or EACCES under gVisor
    assert run(dd, kernel, "open('/data/new.txt', 'w')")["error"]["ename"] in ("OSError", "PermissionError")
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)
    relative = dd.response(
        dd.start(
            "cellbox/createSandbox", {"backend": "docker", "mounts": [{"source": "data", "target": "/d"}]}
        )
    )
    assert relative["error"]["code"] == -32602 and "mounts[0]" in relative["error"]["message"]
    for target in ("/run/cellbox", "/run/cellbox/x", "/workspace/", "/tmp"):  # the sandbox's own
        mounts = [{"source": str(folder), "target": "/data"}, {"source": str(folder), "target": target}]
        refused = dd.response(dd.start("cellbox/createSandbox", {"backend": "docker", "mounts": mounts}))
        assert refused["error"]["code"] == -32602 and "mounts[1].target" in refused["error"]["message"]


def test_network_none_cuts_the_sandbox_off_and_kernels_still_work(
    client: docker.DockerClient, dd: Daemon
) -> None:
    sandbox, kernel = _new(dd, network="none")
    (container,) = _containers(client, sandbox)
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
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
    # the agent's channel is the engine's exec session: it needs no network
    msg_id = _sleep(dd, kernel, f"offline-{sandbox}")
    dd.request("cellbox/interruptKernel", {"kernelId": kernel})
    assert dd.response(msg_id, timeout=15)["result"]["text"] == "up\n"
    dd.request("cellbox/restartKernel", {"kernelId": kernel}, timeout=60)
    assert run(dd, kernel, "sum(range(10))")["text"] == "45\n"
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)


def test_unknown_image_and_runtime(dd: Daemon) -> None:
    error = dd.response(
        dd.start("cellbox/createSandbox", {"backend": "docker", "image": "cellbox-nope:1"}), timeout=120
    )
    assert error["error"]["code"] == 1004 and "cellbox build" in error["error"]["message"], error
    error = dd.response(
        dd.start("cellbox/createSandbox", {"backend": "docker", "runtime": "no-such-runtime"})
    )
    assert error["error"]["code"] == 1003 and "runc" in error["error"]["message"], error


def test_exec_sessions_and_engine_calls_leave_no_fds(dd: Daemon, box: dict) -> None:
    sandbox = box["sandboxId"]

    def fds() -> int:
        return len(os.listdir(f"/proc/{dd.proc.pid}/fd"))

    dd.request("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["json"]})
    before = fds()
    for index in range(20):
        dd.request("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["json"]})
        _write(dd, sandbox, f"n/{index}.txt", b"x")
        other = dd.request("cellbox/startKernel", {"sandboxId": sandbox}, timeout=120)["kernelId"]
        dd.request("cellbox/shutdownKernel", {"kernelId": other})
    assert fds() <= before


def test_daemon_exit_removes_its_containers_and_their_volumes(
    eng: Engine, client: docker.DockerClient
) -> None:
    with Daemon(env=eng.env) as d:
        created = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
        (container,) = _containers(client, created["sandboxId"])
        volumes = [m["Name"] for m in container.attrs["Mounts"] if m["Type"] == "volume"]
        assert len(volumes) == 3
        assert d.proc.stdin is not None
        d.proc.stdin.close()
        d.proc.wait(timeout=15)
    assert _containers(client, created["sandboxId"], sparse=True) == []
    assert not {v.name for v in client.volumes.list()} & set(volumes)


def test_containers_of_a_killed_daemon_are_removed_by_the_next(
    eng: Engine, client: docker.DockerClient
) -> None:
    d = Daemon(env=eng.env)
    created = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)
    d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]}, timeout=120)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    assert len(_containers(client, created["sandboxId"], sparse=True)) == 1
    with Daemon(env=eng.env):
        deadline = time.monotonic() + 30
        while _containers(client, created["sandboxId"], sparse=True) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _containers(client, created["sandboxId"], sparse=True) == []


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


def test_the_seed_flow_end_to_end(client: docker.DockerClient, dd: Daemon) -> None:
    """Build from a dependency file, sandbox with a key, runtime install, a skill put in through
    writeFile, its sources, a new kernel using it."""
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
        _write(dd, sandbox, "skills/notes.py", SEED_SKILL.encode())
        sources = dd.request("cellbox/getSkillSources", {"sandboxId": sandbox, "modules": ["notes"]})
        assert sources["formatted"] == f"```python\n# Module: notes\n\n{SEED_SKILL}\n```"

        kernel = dd.request("cellbox/startKernel", {"sandboxId": sandbox}, timeout=120)["kernelId"]
        result = run(dd, kernel, "import os, notes\nprint(notes.remember(os.environ['NOTES_API_KEY']))")
        assert result["status"] == "ok", result
        assert "k-123" in result["text"] and "^__^" in result["text"]
        assert b"k-123" in _read(dd, sandbox, "notes.json")
        dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)


# --- what a hostile cell can plant ---------------------------------------------------------

_PLANT = """
import glob, os
canary = {canary!r}
# images/ itself, and the names coming executions' images will get, point at the canary folder
os.rename('images', 'images-old')
os.symlink(canary, 'images')
os.makedirs('real-images', exist_ok=True)
os.symlink(canary + '/planted.txt', 'out-file')
os.symlink('/etc', 'out-dir')
os.symlink('real-images', 'in-dir')
# everything of the agent's: its kernels' connection files, sockets and credits FIFOs
for path in glob.glob('/tmp/cellbox-agent-*/*'):
    os.remove(path)
    os.symlink(canary + '/' + os.path.basename(path), path)
print('planted')
"""


def test_symlinks_a_cell_plants_lead_nowhere_outside_the_sandbox(dd: Daemon) -> None:
    """A cell replaces what it can reach with symlinks to a folder of the daemon's machine: its
    images/ folder, its workspace's files, the agent's own files; neither images, nor file
    operations, nor new kernels make the daemon touch that folder."""
    canary = Path(tempfile.mkdtemp(prefix="cellbox-canary-"))
    (canary / "planted.txt").write_text("the daemon's file")
    before = sorted(p.name for p in canary.iterdir())
    sandbox, kernel = _new(dd)
    assert run(dd, kernel, _PLANT.format(canary=str(canary)))["text"] == "planted\n"
    display = "from IPython.display import SVG, display\ndisplay(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"/>'))"
    result = run(dd, kernel, display)
    assert result["status"] == "ok" and "file" not in result["outputs"][0]  # not saved, nowhere
    for path in ("out-file", "out-dir/passwd", "images/x.png", "/etc/passwd", "../x", "a/../../x"):
        for method, params in (
            ("cellbox/readFile", {"path": path}),
            ("cellbox/writeFile", {"path": path, "content": "eA=="}),
            ("cellbox/deleteFile", {"path": path}),
        ):
            if (method, path) == ("cellbox/deleteFile", "out-file"):
                continue  # the symlink itself is in the workspace: deleting it is below
            answer = dd.response(dd.start(method, {"sandboxId": sandbox, **params}))
            assert answer.get("error", {}).get("code") == -32602, (method, path, answer)
    dd.request("cellbox/deleteFile", {"sandboxId": sandbox, "path": "out-file"})  # the link, not its target
    _write(dd, sandbox, "in-dir/ok.txt", b"inside")  # a symlink inside the workspace is followed
    assert _read(dd, sandbox, "real-images/ok.txt") == b"inside"
    other = dd.request("cellbox/startKernel", {"sandboxId": sandbox}, timeout=120)["kernelId"]
    assert run(dd, other, "6 * 7")["text"] == "42\n"
    assert sorted(p.name for p in canary.iterdir()) == before
    assert (canary / "planted.txt").read_text() == "the daemon's file"
    dd.request("cellbox/destroySandbox", {"sandboxId": sandbox}, timeout=60)


# --- the command line, against the local engine ---------------------------------------------


def _cellbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellboxd", *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_ps_lists_sandboxes_and_prune_removes_orphans(eng: Engine, client: docker.DockerClient) -> None:
    if eng.name != "local":
        pytest.skip("the command line reads DOCKER_HOST; one engine shows it")
    d = Daemon()
    local = d.request("cellbox/createSandbox", {})["sandboxId"]
    container = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)["sandboxId"]
    rows = {line.split()[0]: line.split() for line in _cellbox("ps").stdout.splitlines()[1:]}
    assert rows[local][1:4] == ["local", str(d.proc.pid), "running"]
    assert rows[container][1:4] == ["docker", str(d.proc.pid), "running"]
    assert _cellbox("prune").stdout == ""  # a running daemon's sandboxes stay
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    assert not {local, container} & {line.split()[0] for line in _cellbox("ps").stdout.splitlines()[1:]}
    orphans = {line.split()[0]: line.split()[3] for line in _cellbox("ps", "--all").stdout.splitlines()[1:]}
    assert orphans[local] == orphans[container] == "orphaned"
    removed = _cellbox("prune").stdout.split()
    assert local in removed and container in removed
    assert _containers(client, container, sparse=True) == []


def test_a_sweep_takes_only_the_orphans_of_its_own_engine(cellbox_home: Path) -> None:
    """A killed daemon's container on one engine is left alone by a daemon on another engine
    (whose sweep could not remove it, and must not forget it), and removed by one on its own."""
    local, remote = engine("local"), engine("tcp")
    d = Daemon(env=remote.env)
    sandbox = d.request("cellbox/createSandbox", {"backend": "docker"}, timeout=600)["sandboxId"]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    folder = cellbox_home / "data" / "sandboxes" / sandbox
    with Daemon(env=local.env) as other:
        other.request("cellbox/createSandbox", {})  # waits for its sweep
        assert folder.is_dir()
    client = remote.client()
    assert len(_containers(client, sandbox, sparse=True)) == 1
    with Daemon(env=remote.env) as successor:
        successor.request("cellbox/createSandbox", {})
        assert not folder.exists()
        deadline = time.monotonic() + 30
        while _containers(client, sandbox, sparse=True) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _containers(client, sandbox, sparse=True) == []
