"""The warm pool: sandboxes kept ready with a kernel started, taken by fitting requests."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bench.procfs import descendant_pids
from tests.rpc import Daemon
from tests.test_cleanup import _wait_gone

CREATE, START, EXECUTE, LIST = (
    "cellbox/createSandbox",
    "cellbox/startKernel",
    "cellbox/execute",
    "cellbox/listSandboxes",
)


def _pool(d: Daemon) -> list[dict[str, Any]]:
    return d.request(LIST, {})["pool"]


def _wait_ready(d: Daemon, ready: int, within: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while (pool := _pool(d))[0]["ready"] < ready:
        assert time.monotonic() < deadline, f"the pool did not fill: {pool}"
        time.sleep(0.1)
    return pool


def _kernel_pids(daemon_pid: int) -> set[int]:
    """The daemon's descendants that are kernels (its agents' children)."""
    found = set()
    for pid in descendant_pids(daemon_pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            if b"ipykernel_launcher" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return found


def _pid(d: Daemon, kernel_id: str) -> int:
    result = d.request(EXECUTE, {"kernelId": kernel_id, "code": "import os; os.getpid()"})
    assert result["status"] == "ok", result
    return int(result["text"])


@pytest.fixture
def pooled() -> Any:
    with Daemon(env={"CELLBOX_POOL": "local=1"}) as d:
        yield d


def test_a_fitting_request_takes_the_ready_sandbox_and_the_pool_refills(pooled: Daemon) -> None:
    d = pooled
    assert _wait_ready(d, 1) == [{"backend": "local", "size": 1, "ready": 1}]
    assert d.request(LIST, {})["sandboxes"] == []  # a pooled sandbox is nobody's yet
    (waiting,) = _kernel_pids(d.proc.pid)
    assert d.notes("cellbox/kernelStatus") == []  # nor are its kernel's states

    sandbox = d.request(CREATE, {"name": "mine"})
    assert _pool(d)[0]["ready"] == 0
    kernel = d.request(START, {"sandboxId": sandbox["sandboxId"], "name": "k"})["kernelId"]
    assert _pid(d, kernel) == waiting  # the kernel that was started ahead of time
    assert d.notes("cellbox/kernelStatus")[0] == {"kernelId": kernel, "state": "idle"}
    listed = d.request(LIST, {})["sandboxes"]
    assert [(s["sandboxId"], s["name"], s["kernels"]) for s in listed] == [
        (sandbox["sandboxId"], "mine", [kernel])
    ]
    # its workspace is the sandbox's own, and a second kernel in it starts the usual way
    assert Path(sandbox["workspace"]).is_dir()
    second = d.request(START, {"sandboxId": sandbox["sandboxId"]})["kernelId"]
    assert _pid(d, second) != waiting

    _wait_ready(d, 1)
    assert len(_kernel_pids(d.proc.pid)) == 3  # the two kernels and a new pooled one


def test_a_pooled_sandbox_is_never_handed_out_twice(pooled: Daemon) -> None:
    d = pooled
    _wait_ready(d, 1)
    # five at once, pipelined: one from the pool, the others made anew
    ids = [d.start(CREATE, {}) for _ in range(5)]
    sandboxes = [d.response(i)["result"]["sandboxId"] for i in ids]
    kernels = [d.request(START, {"sandboxId": s})["kernelId"] for s in sandboxes]
    assert len(set(sandboxes)) == 5 and len(set(kernels)) == 5
    assert len({_pid(d, k) for k in kernels}) == 5
    d.request(EXECUTE, {"kernelId": kernels[0], "code": "x = 'first'"})
    assert d.request(EXECUTE, {"kernelId": kernels[1], "code": "'x' in dir()"})["text"] == "False\n"


def test_a_request_that_does_not_fit_is_made_anew(pooled: Daemon) -> None:
    d = pooled
    _wait_ready(d, 1)
    sandbox = d.request(CREATE, {"env": {"CELLBOX_TEST": "set"}})["sandboxId"]
    assert _pool(d)[0]["ready"] == 1  # the pooled one still waits
    kernel = d.request(START, {"sandboxId": sandbox})["kernelId"]
    text = d.request(EXECUTE, {"kernelId": kernel, "code": "import os; os.environ['CELLBOX_TEST']"})["text"]
    assert text == "'set'\n"


def test_a_pooled_kernel_that_died_while_waiting_is_not_handed_out(pooled: Daemon) -> None:
    d = pooled
    _wait_ready(d, 1)
    (waiting,) = _kernel_pids(d.proc.pid)
    os.kill(waiting, signal.SIGKILL)
    assert not _wait_gone([waiting], 10)
    # the pool notices, throws the sandbox away and makes another
    deadline = time.monotonic() + 60
    while not ((pids := _kernel_pids(d.proc.pid)) and _pool(d)[0]["ready"] == 1):
        assert time.monotonic() < deadline, "the pool did not replace its dead sandbox"
        time.sleep(0.1)
    assert waiting not in pids
    sandbox = d.request(CREATE, {})["sandboxId"]
    kernel = d.request(START, {"sandboxId": sandbox})["kernelId"]
    assert _pid(d, kernel) != waiting
    assert d.request(EXECUTE, {"kernelId": kernel, "code": "1 + 1"})["text"] == "2\n"


def test_the_pool_goes_with_the_daemon(cellbox_home: Path) -> None:
    d = Daemon(env={"CELLBOX_POOL": "local=2"})
    _wait_ready(d, 2)
    pids = _kernel_pids(d.proc.pid)
    assert len(pids) == 2
    folders = {p.name for p in (cellbox_home / "data" / "sandboxes").iterdir() if p.is_dir()}
    assert d.close() == 0
    assert not _wait_gone(list(pids), 10)
    left = {p.name for p in (cellbox_home / "data" / "sandboxes").iterdir()} & folders
    assert not left, f"pooled sandbox folders left behind: {left}"


def test_the_pool_from_initialization_options_and_its_errors() -> None:
    with Daemon(initialize=False) as d:
        bad = d.response(
            d.start(
                "initialize",
                {"capabilities": {}, "initializationOptions": {"pool": [{"backend": "local", "size": -1}]}},
            )
        )
        assert bad["error"]["code"] == -32602 and "$.pool[0].size" in bad["error"]["message"]
        bad = d.response(
            d.start(
                "initialize",
                {"capabilities": {}, "initializationOptions": {"pool": [{"backend": "local", "image": "x"}]}},
            )
        )
        assert bad["error"]["code"] == -32602 and "needs backend 'docker'" in bad["error"]["message"]
        d.request("initialize", {"capabilities": {}, "initializationOptions": {"pool": [{"size": 1}]}})
        assert _wait_ready(d, 1) == [{"backend": "local", "size": 1, "ready": 1}]


def test_a_bad_pool_variable_stops_the_daemon_with_a_clear_message() -> None:
    d = Daemon(initialize=False, env={"CELLBOX_POOL": "local=two"})
    assert d.proc.wait(timeout=30) == 2
    time.sleep(0.2)
    assert "CELLBOX_POOL: 'local=two' is not BACKEND[:IMAGE]=SIZE" in "".join(d.stderr_lines)


def test_a_docker_pool_hands_out_a_container_sandbox(docker_engine: None) -> None:
    with Daemon(env={"CELLBOX_POOL": "docker=1"}) as d:
        pool = _wait_ready(d, 1, within=300)
        assert pool == [{"backend": "docker", "size": 1, "ready": 1, "image": "minimal"}]
        sandbox = d.request(CREATE, {"backend": "docker"})
        assert sandbox["backend"] == "docker" and sandbox["image"].startswith("cellbox-minimal:")
        kernel = d.request(START, {"sandboxId": sandbox["sandboxId"]})["kernelId"]
        result = d.request(EXECUTE, {"kernelId": kernel, "code": "import os; os.getcwd()"})
        assert result["text"] == "'/workspace'\n"
        # the default image and the default variant named are the same kind of sandbox
        assert _wait_ready(d, 1, within=120)[0]["ready"] == 1
        assert d.request(CREATE, {"backend": "docker", "image": "minimal"})["sandboxId"]
        assert _pool(d)[0]["ready"] == 0


@pytest.mark.parametrize("after", [0.3, 0.8, 1.5])
def test_a_daemon_that_leaves_while_its_docker_pool_fills_leaves_no_container(
    docker_engine: None, after: float
) -> None:
    import docker

    d = Daemon(env={"CELLBOX_POOL": "docker=2"})
    time.sleep(after)  # somewhere in making the pool's containers and kernels
    assert d.close() == 0
    engine = docker.from_env()
    try:
        left = engine.containers.list(all=True, filters={"label": f"cellbox.daemon.pid={d.proc.pid}"})
    finally:
        engine.close()
    assert left == [], f"containers left behind: {[c.name for c in left]}"
