"""cellbox/execute and the kernel methods, over the raw wire against a real daemon."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from cellboxd.execution import COALESCE_SECONDS
from tests.conftest import new_kernel, runtime_dir
from tests.rpc import SERVE, Daemon

EXECUTE = "cellbox/execute"


def run(d: Daemon, kernel_id: str, code: str, **params: object) -> dict:
    return d.request(EXECUTE, {"kernelId": kernel_id, "code": code, **params})


def test_stdout_stderr_stream_in_order_and_result_collects_text(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    code = (
        "import sys\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    print('e%d' % i, file=sys.stderr, flush=True)\n"
        "'done'"
    )
    result = run(d, kernel, code, executionId="ex-order")
    assert result["executionId"] == "ex-order"
    assert result["status"] == "ok"
    assert result["truncated"] is False
    streamed = [n for n in d.notes("cellbox/output") if n["executionId"] == "ex-order"]
    assert all(n["kernelId"] == kernel for n in streamed)
    pairs = [(n["stream"], n["text"]) for n in streamed]
    expected = []
    for i in range(5):
        expected += [("stdout", f"{i}\n"), ("stderr", f"e{i}\n")]
    assert pairs == expected
    assert result["text"] == "".join(text for _, text in expected) + "'done'\n"
    assert result["outputs"] == [{"data": {"text/plain": "'done'"}, "metadata": {}}]
    assert isinstance(result["executionCount"], int)


def test_output_still_buffered_when_a_cell_ends_is_in_its_result(shared_daemon: Daemon) -> None:
    # the kernel's flushes skip the wait when nothing is buffered: what a cell leaves buffered
    # (no newline, no flush), or a thread wrote just before the end, must still be in its result
    d = shared_daemon
    _, kernel = new_kernel(d)
    run(d, kernel, "import sys, threading")
    for i in range(30):
        code = (
            f"sys.stdout.write('o{i}')\nsys.stderr.write('e{i}')\n"
            f"t = threading.Thread(target=print, args=('t{i}',), kwargs={{'end': ''}})\nt.start(); t.join()"
        )
        result = run(d, kernel, code)
        assert result["status"] == "ok"
        text = result["text"]
        assert len(text) == len(f"o{i}t{i}e{i}") and f"o{i}t{i}" in text.replace(f"e{i}", ""), (i, text)


def test_small_outputs_are_coalesced_within_a_bounded_delay(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    # each flush is an IOPub message of its own: 1000 of them (the cell times them), then one
    # after a pause
    code = (
        "import sys, time\nstarted = time.perf_counter()\nfor i in range(1000):\n    print(i, flush=True)\n"
        "took = time.perf_counter() - started\ntime.sleep(0.3)\nprint('late', flush=True)\n"
        "print(took, file=sys.stderr)"
    )
    result = run(d, kernel, code, executionId="ex-coalesce")
    assert result["status"] == "ok"
    notes = [n for n in d.notes("cellbox/output") if n["executionId"] == "ex-coalesce"]
    streamed = [n["text"] for n in notes if n["stream"] == "stdout"]
    took = float(next(n["text"] for n in notes if n["stream"] == "stderr"))
    assert "".join(streamed) == "".join(f"{i}\n" for i in range(1000)) + "late\n"
    # a notification at most per window of 5 ms, however fast the kernel prints
    windows = took / COALESCE_SECONDS
    assert len(streamed) - 1 <= windows + 2, f"{len(streamed)} notifications for 1000 flushes in {took:.3f} s"
    assert len(streamed) < 500
    # what came before the pause went out before it ended
    assert streamed[-1] == "late\n"


def test_state_persists_and_generated_execution_id(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    first = run(d, kernel, "x = 41")
    second = run(d, kernel, "x + 1")
    assert first["executionId"] != second["executionId"] and len(first["executionId"]) >= 16
    assert second["text"] == "42\n"
    assert second["executionCount"] == first["executionCount"] + 1


def test_user_exception_is_a_result_with_plain_traceback(shared_daemon: Daemon) -> None:
    _, kernel = new_kernel(shared_daemon)
    result = run(shared_daemon, kernel, "print('before')\ndef f():\n    raise ValueError('bad value')\nf()")
    assert result["status"] == "error"
    assert result["text"] == "before\n"
    error = result["error"]
    assert (error["ename"], error["evalue"]) == ("ValueError", "bad value")
    joined = "\n".join(error["traceback"])
    assert "raise ValueError" in joined and "\x1b[" not in joined


def test_rich_outputs_are_displayed_and_images_saved(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    code = (
        "from IPython.display import display, Image, HTML\n"
        f"display(Image(data={png!r}))\n"
        "display(HTML('<b>hi</b>'))\n"
    )
    result = run(d, kernel, code, executionId="ex-rich")
    assert result["status"] == "ok"
    image, html = result["outputs"]
    assert base64.b64decode(image["data"]["image/png"]) == png
    path = Path(image["path"])
    assert path.parent.name == "images" and path.read_bytes() == png
    assert html["data"]["text/html"] == "<b>hi</b>" and "path" not in html
    displays = [n for n in d.notes("cellbox/display") if n["executionId"] == "ex-rich"]
    assert [n.get("path") for n in displays] == [str(path), None]
    assert result["text"] == ""  # display_data's text/plain is not a result


def test_matplotlib_figure_becomes_a_png_in_images(shared_daemon: Daemon) -> None:
    pytest.importorskip("matplotlib")
    _, kernel = new_kernel(shared_daemon)
    result = run(
        shared_daemon, kernel, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()", timeout=60
    )
    assert result["status"] == "ok", result
    paths = [o["path"] for o in result["outputs"] if "path" in o]
    assert len(paths) == 1 and Path(paths[0]).read_bytes().startswith(b"\x89PNG")


def test_text_cap_truncates_the_result_but_not_the_stream(cellbox_home: Path) -> None:
    with Daemon(env={"CELLBOX_TEXT_CAP": "100"}) as d:
        _, kernel = new_kernel(d)
        result = run(d, kernel, "for i in range(50):\n    print('x' * 9)", executionId="ex-cap")
        assert result["truncated"] is True
        assert result["text"] == ("x" * 9 + "\n") * 10
        streamed = "".join(n["text"] for n in d.notes("cellbox/output") if n["executionId"] == "ex-cap")
        assert streamed == ("x" * 9 + "\n") * 50


def test_outputs_count_against_the_cap_and_images_keep_their_path(cellbox_home: Path) -> None:
    with Daemon(env={"CELLBOX_TEXT_CAP": "2000"}) as d:
        _, kernel = new_kernel(d)
        code = (
            "from IPython.display import display, HTML, SVG\n"
            "for i in range(20):\n"
            "    display(HTML('<p>' + 'x' * 300 + '</p>'))\n"
            "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\">' + ' ' * 5000 + '</svg>'))\n"
        )
        result = run(d, kernel, code, executionId="ex-outcap")
        assert result["status"] == "ok" and result["truncated"] is True
        kept = result["outputs"]
        sizes = [sum(len(v) for v in o.get("data", {}).values()) for o in kept]
        assert 0 < len(kept) < 21 and sum(sizes) <= 2000
        # the image past the cap is there as its file
        assert kept[-1].get("data", {}) == {} and kept[-1]["path"].endswith(".svg")
        assert Path(kept[-1]["path"]).stat().st_size > 5000
        displayed = [n for n in d.notes("cellbox/display") if n["executionId"] == "ex-outcap"]
        assert len(displayed) == 21


def test_timeout_interrupts_and_returns_partial_output_in_time(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    run(d, kernel, "state = 'kept'")
    started = time.monotonic()
    result = run(d, kernel, "import time\nprint('partial', flush=True)\ntime.sleep(60)", timeout=1.5)
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout"
    assert result["text"] == "partial\n"
    assert result["error"]["ename"] == "TimeoutError"
    assert elapsed < 1.5 + 1.0
    # interrupted, not restarted: the kernel's state survives
    assert run(d, kernel, "state")["text"] == "'kept'\n"


def test_timeout_restarts_a_kernel_that_ignores_the_interrupt(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    run(d, kernel, "state = 'lost'")
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('stubborn', flush=True)\n"
        "time.sleep(60)"
    )
    started = time.monotonic()
    result = run(d, kernel, code, timeout=1)
    assert time.monotonic() - started < 1 + 1.0
    assert result["status"] == "timeout"
    assert result["text"] == "stubborn\n"
    assert "restarted" in result["error"]["evalue"]
    # the next execute waits for the restart and runs on a fresh kernel
    after = run(d, kernel, "'state' in globals()")
    assert after["status"] == "ok" and after["text"] == "False\n"


def test_cancel_request_interrupts_and_keeps_the_partial_result(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    msg_id = d.start(
        EXECUTE, {"kernelId": kernel, "code": "import time\nprint('went', flush=True)\ntime.sleep(60)"}
    )
    deadline = time.monotonic() + 30
    while not any(n["text"] == "went\n" for n in d.notes("cellbox/output")):
        assert time.monotonic() < deadline
        d.next_message(timeout=30)
    started = time.monotonic()
    d.notify("$/cancelRequest", {"id": msg_id})
    response = d.response(msg_id, timeout=10)
    assert time.monotonic() - started < 2
    error = response["error"]
    assert error["code"] == -32800
    partial = error["data"]["result"]
    assert partial["status"] == "cancelled" and partial["text"] == "went\n"
    assert run(d, kernel, "1 + 1")["text"] == "2\n"


def test_kernel_killed_mid_execution_dies_promptly(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    started = time.monotonic()
    result = run(
        d, kernel, "import os, time\nprint('bye', flush=True)\ntime.sleep(0.2)\nos._exit(3)", timeout=60
    )
    assert time.monotonic() - started < 5
    assert result["status"] == "died"
    assert result["text"] == "bye\n"
    assert result["error"]["ename"] == "KernelDied"
    states = [n["state"] for n in d.notes("cellbox/kernelStatus") if n["kernelId"] == kernel]
    assert states[:2] == ["starting", "idle"] and states[-1] == "dead"
    response = d.response(d.start(EXECUTE, {"kernelId": kernel, "code": "1"}))
    assert response["error"]["code"] == 1007
    d.request("cellbox/restartKernel", {"kernelId": kernel})
    assert run(d, kernel, "40 + 2")["text"] == "42\n"


def test_a_killed_agent_is_replaced_and_its_kernels_start_again(shared_daemon: Daemon) -> None:
    """The kernel's parent is the sandbox's agent: killed, the kernel dies with it; a restart
    starts a new agent, whose kernels start where the old one's left their files."""
    d = shared_daemon
    sandbox, kernel = new_kernel(d)
    other = d.request("cellbox/startKernel", {"sandboxId": sandbox})["kernelId"]
    result = run(
        d, kernel, "import os, signal; os.kill(os.getppid(), signal.SIGKILL); import time; time.sleep(30)"
    )
    assert (result["status"], result["error"]["ename"]) == ("died", "KernelDied")
    d.request("cellbox/restartKernel", {"kernelId": kernel})
    d.request("cellbox/restartKernel", {"kernelId": other})
    assert [run(d, k, "6 * 7")["text"] for k in (kernel, other)] == ["42\n", "42\n"]
    d.request("cellbox/destroySandbox", {"sandboxId": sandbox})


def test_executes_on_one_kernel_run_in_arrival_order(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    run(d, kernel, "seen = []")
    ids = [
        d.start(
            EXECUTE, {"kernelId": kernel, "code": f"import time; time.sleep(0.{3 - i}); seen.append({i})"}
        )
        for i in range(3)
    ]
    for msg_id in ids:
        assert d.response(msg_id)["result"]["status"] == "ok"
    assert run(d, kernel, "seen")["text"] == "[0, 1, 2]\n"


def test_kernels_run_in_parallel(shared_daemon: Daemon) -> None:
    d = shared_daemon
    sandbox, first = new_kernel(d)
    second = d.request("cellbox/startKernel", {"sandboxId": sandbox})["kernelId"]
    started = time.monotonic()
    ids = [d.start(EXECUTE, {"kernelId": k, "code": "import time; time.sleep(2)"}) for k in (first, second)]
    for msg_id in ids:
        assert d.response(msg_id)["result"]["status"] == "ok"
    assert time.monotonic() - started < 3.5


def test_kernels_of_a_sandbox_share_its_workspace(shared_daemon: Daemon) -> None:
    d = shared_daemon
    sandbox, first = new_kernel(d)
    second = d.request("cellbox/startKernel", {"sandboxId": sandbox, "name": "second"})["kernelId"]
    run(d, first, "open('shared.txt', 'w').write('from first')")
    assert run(d, second, "open('shared.txt').read()")["text"] == "'from first'\n"
    listed = [s for s in d.request("cellbox/listSandboxes", {})["sandboxes"] if s["sandboxId"] == sandbox]
    assert sorted(listed[0]["kernels"]) == sorted([first, second])


def test_interrupt_restart_and_shutdown_kernel(shared_daemon: Daemon) -> None:
    d = shared_daemon
    sandbox, kernel = new_kernel(d)
    msg_id = d.start(EXECUTE, {"kernelId": kernel, "code": "import time; time.sleep(60)"})
    time.sleep(1)
    assert d.request("cellbox/interruptKernel", {"kernelId": kernel}) is None
    interrupted = d.response(msg_id, timeout=10)["result"]
    assert interrupted["status"] == "error" and interrupted["error"]["ename"] == "KeyboardInterrupt"

    run(d, kernel, "x = 1")
    assert d.request("cellbox/restartKernel", {"kernelId": kernel}) is None
    assert "restarting" in [n["state"] for n in d.notes("cellbox/kernelStatus") if n["kernelId"] == kernel]
    assert run(d, kernel, "'x' in globals()")["text"] == "False\n"

    assert d.request("cellbox/shutdownKernel", {"kernelId": kernel}) is None
    assert d.response(d.start(EXECUTE, {"kernelId": kernel, "code": "1"}))["error"]["code"] == 1002
    listed = [s for s in d.request("cellbox/listSandboxes", {})["sandboxes"] if s["sandboxId"] == sandbox]
    assert listed[0]["kernels"] == []


def test_env_reaches_the_kernel_and_skills_are_importable(shared_daemon: Daemon) -> None:
    d = shared_daemon
    created = d.request("cellbox/createSandbox", {"env": {"API_KEY": "sekret"}, "name": "envy"})
    workspace = Path(created["workspace"])
    (workspace / "skills" / "greet.py").write_text("def hello():\n    return 'hello from a skill'\n")
    kernel = d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]})["kernelId"]
    result = run(d, kernel, "import os, greet\nprint(os.environ['API_KEY'], os.getcwd())\ngreet.hello()")
    assert result["text"] == f"sekret {workspace}\n'hello from a skill'\n"


def test_destroy_sandbox_stops_kernels_and_removes_its_folder(
    shared_daemon: Daemon, cellbox_home: Path
) -> None:
    d = shared_daemon
    created = d.request("cellbox/createSandbox", {})
    kernel = d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]})["kernelId"]
    pid = int(run(d, kernel, "import os; os.getpid()")["text"])
    sockets = runtime_dir(cellbox_home) / created["sandboxId"]
    assert any(p.is_socket() for p in sockets.iterdir())  # the kernel's, in the sandbox's own folder
    assert d.request("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}) is None
    assert not Path(created["workspace"]).exists()
    assert not sockets.exists()
    assert _gone(pid, within=5)
    assert (
        d.response(d.start("cellbox/destroySandbox", {"sandboxId": created["sandboxId"]}))["error"]["code"]
        == 1001
    )
    assert d.response(d.start(EXECUTE, {"kernelId": kernel, "code": "1"}))["error"]["code"] == 1002


def test_kernels_of_a_sandbox_keep_their_own_history_in_memory(shared_daemon: Daemon) -> None:
    # a shared history file locks under load, and IPython then prints its warning into a cell
    d = shared_daemon
    sandbox, first = new_kernel(d)
    second = d.request("cellbox/startKernel", {"sandboxId": sandbox})["kernelId"]
    run(d, first, "a = 'only in first'")
    run(d, second, "b = 2")
    code = "h = get_ipython().history_manager\nprint(h.hist_file, [c for _, _, c in h.get_range()])"
    assert run(d, first, code)["text"] == f":memory: {['a = ' + repr('only in first'), code]}\n"
    assert run(d, second, code)["text"] == f":memory: {['b = 2', code]}\n"


def test_outputs_of_parallel_kernels_do_not_mix(shared_daemon: Daemon) -> None:
    d = shared_daemon
    kernels = [new_kernel(d)[1] for _ in range(3)]
    ids = {
        d.start(
            EXECUTE,
            {"kernelId": k, "code": f"for i in range(20): print('{k}', i)", "executionId": f"mix-{k}"},
        ): k
        for k in kernels
    }
    for msg_id, k in ids.items():
        result = d.response(msg_id)["result"]
        assert result["text"] == "".join(f"{k} {i}\n" for i in range(20))
        streamed = "".join(n["text"] for n in d.notes("cellbox/output") if n["executionId"] == f"mix-{k}")
        assert streamed == result["text"]


def test_pipelined_executes_on_many_kernels_never_cross_answers(shared_daemon: Daemon) -> None:
    # 16 kernels, each sent its 250 executes at once before any answer is read: every answer,
    # its streamed text and its value, must be its own cell's
    d = shared_daemon
    sandboxes = [d.request("cellbox/createSandbox", {})["sandboxId"] for _ in range(4)]
    kernels = [
        d.request("cellbox/startKernel", {"sandboxId": sandboxes[i % 4]})["kernelId"] for i in range(16)
    ]
    expected: dict[int, tuple[str, str]] = {}
    for i in range(250):
        for k, kernel in enumerate(kernels):
            n = k * 1000 + i
            params = {"kernelId": kernel, "code": f"print('c{n}')\n{n} * 3", "executionId": f"x-{n}"}
            expected[d.start(EXECUTE, params)] = (f"x-{n}", f"c{n}\n{n * 3}\n")
    for msg_id, (execution_id, text) in expected.items():
        result = d.response(msg_id, timeout=300)["result"]
        assert (result["executionId"], result["status"], result["text"]) == (execution_id, "ok", text)
    streamed: dict[str, str] = {}
    for note in d.notes("cellbox/output"):
        if note["executionId"].startswith("x-"):
            streamed[note["executionId"]] = streamed.get(note["executionId"], "") + note["text"]
    assert streamed == {execution_id: text.split("\n")[0] + "\n" for execution_id, text in expected.values()}
    d.notifications.clear()


def _gone(pid: int, within: float) -> bool:
    import os

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_restart_during_an_execution_ends_it_as_died(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    msg_id = d.start(
        EXECUTE, {"kernelId": kernel, "code": "import time; print('running', flush=True); time.sleep(60)"}
    )
    time.sleep(1)
    assert d.request("cellbox/restartKernel", {"kernelId": kernel}) is None
    result = d.response(msg_id, timeout=10)["result"]
    assert result["status"] == "died" and result["text"] == "running\n"
    assert result["error"]["evalue"] == "the kernel was restarted"
    assert run(d, kernel, "1 + 1")["text"] == "2\n"


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _read_frame(stream: IO[bytes]) -> dict:
    length = None
    while line := stream.readline().strip():
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    assert length is not None
    return json.loads(stream.read(length))


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_a_client_that_stops_reading_holds_the_kernel_back_not_the_daemons_memory(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """A cell prints 300 MB while the client reads nothing for 3 s: the kernel waits (credits),
    the daemon's memory stays bounded, and every byte arrives once the client reads again."""
    if backend == "docker":
        request.getfixturevalue("docker_engine")
    proc = subprocess.Popen(SERVE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    try:

        def call(msg_id: int, method: str, params: dict) -> dict:
            proc.stdin.write(_frame({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}))
            proc.stdin.flush()
            while (message := _read_frame(proc.stdout)).get("id") != msg_id:
                pass
            return message["result"]

        call(1, "initialize", {"capabilities": {}})
        sandbox = call(2, "cellbox/createSandbox", {"backend": backend})["sandboxId"]
        kernel = call(3, "cellbox/startKernel", {"sandboxId": sandbox})["kernelId"]
        code = "line = 'x' * 1023\nfor _ in range(300 * 1024):\n    print(line)"
        params = {"kernelId": kernel, "code": code}
        proc.stdin.write(_frame({"jsonrpc": "2.0", "id": 4, "method": "cellbox/execute", "params": params}))
        proc.stdin.flush()
        time.sleep(3)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_mb = int(status.split("VmRSS:")[1].split()[0]) // 1024
        assert rss_mb < 200, f"the daemon holds {rss_mb} MB for a client that reads nothing"
        received = 0
        while (message := _read_frame(proc.stdout)).get("id") != 4:
            if message.get("method") == "cellbox/output":
                received += len(message["params"]["text"])
        assert message["result"]["status"] == "ok"
        assert received == 300 * 1024 * 1024
    finally:
        proc.stdin.close()  # the daemon stops its kernels and removes its sandbox
        try:
            proc.wait(timeout=15)
        finally:
            proc.kill()
