"""The Python client against a real daemon, run as a subprocess (`python -m cellboxd serve`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cellbox import (
    AsyncClient,
    AsyncKernel,
    AsyncSandbox,
    Client,
    InstallFailed,
    KernelNotFound,
    ModuleNotFound,
    RequestCancelled,
    SandboxNotFound,
    TransportError,
    methods,
)
from cellbox import types as t
from cellbox.client import _read_frame, default_command

DAEMON = [sys.executable, "-m", "cellboxd", "serve"]
# Surely not installed in the daemon's environment; pure Python and small.
PACKAGE, MODULE = "cowsay==6.1", "cowsay"


@pytest.fixture
async def client() -> AsyncIterator[AsyncClient]:
    async with AsyncClient(DAEMON) as client:
        yield client


@pytest.fixture
async def sandbox(client: AsyncClient) -> AsyncIterator[AsyncSandbox]:
    async with await client.create_sandbox("local") as sandbox:
        yield sandbox


@pytest.fixture
async def kernel(sandbox: AsyncSandbox) -> AsyncIterator[AsyncKernel]:
    async with await sandbox.start_kernel() as kernel:
        yield kernel


@pytest.fixture
def sync_client() -> Iterator[Client]:
    with Client(DAEMON) as client:
        yield client


# --- framing -------------------------------------------------------------------------------


async def test_read_frame_skips_other_headers_and_ends_cleanly() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(
        b"Content-Length: 2\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n{}"
    )
    reader.feed_data(b'content-length:  7\r\n\r\n{"a":1}')
    reader.feed_eof()
    assert await _read_frame(reader) == b"{}"
    assert await _read_frame(reader) == b'{"a":1}'
    assert await _read_frame(reader) is None


async def test_read_frame_without_length_is_a_transport_error() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"Content-Type: x\r\n\r\n{}")
    with pytest.raises(TransportError, match="Content-Length"):
        await _read_frame(reader)


# --- lifecycle -----------------------------------------------------------------------------


async def test_initialize_reports_the_server_and_its_backends(client: AsyncClient) -> None:
    assert client.server_info.name == "cellbox"
    assert client.capabilities.protocol_version == t.PROTOCOL_VERSION
    assert "local" in client.capabilities.backends
    assert client.capabilities.default_backend in client.capabilities.backends


async def test_close_stops_the_daemon() -> None:
    client = await AsyncClient(DAEMON).start()
    pid = client.pid
    await client.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(TransportError):
        await client.list_sandboxes()


async def test_initialization_options_and_log_messages(tmp_path: Path) -> None:
    logs: list[str] = []
    async with (
        AsyncClient(DAEMON, data_dir=tmp_path, log_level="debug", on_log=logs.append) as client,
        await client.create_sandbox("local") as sandbox,
    ):
        assert Path(sandbox.workspace).is_relative_to(tmp_path)
        assert any(sandbox.sandbox_id in line for line in logs)


def test_default_command_runs_a_cellbox_daemon() -> None:
    assert "serve" in default_command()
    with Client() as client:
        assert client.server_info.name == "cellbox"


# --- execution -----------------------------------------------------------------------------


async def test_execute_keeps_state_between_cells(kernel: AsyncKernel) -> None:
    first = await kernel.execute("x = 21")
    result = await kernel.execute("print(x * 2)\nx", timeout=30)
    assert first.status == result.status == "ok"
    assert result.text.startswith("42\n")
    assert result.outputs[0].data["text/plain"] == "21"
    assert first.execution_count is not None and result.execution_count == first.execution_count + 1
    assert result.error is None


async def test_an_exception_is_an_error_result_with_its_traceback(kernel: AsyncKernel) -> None:
    result = await kernel.execute("def f():\n    raise ValueError('boom')\nf()")
    assert result.status == "error"
    assert result.error is not None
    assert (result.error.ename, result.error.evalue) == ("ValueError", "boom")
    assert any("ValueError" in line for line in result.error.traceback)
    assert "\x1b[" not in "".join(result.error.traceback)


async def test_stream_yields_outputs_and_displays_in_order(kernel: AsyncKernel) -> None:
    execution = kernel.stream(
        "import sys\nfrom IPython.display import display\n"
        "for i in range(4):\n    print(i, flush=True)\n"
        "print('warn', file=sys.stderr, flush=True)\n"
        "display({'text/plain': 'shown'}, raw=True)\n"
        "print('last', flush=True)"
    )
    events = [event async for event in execution]
    result = await execution.result()
    assert all(event.execution_id == execution.execution_id for event in events)
    assert result.execution_id == execution.execution_id and result.status == "ok"
    seen = [
        (e.stream, e.text) if isinstance(e, t.OutputNotification) else ("display", e.data["text/plain"])
        for e in events
    ]
    # Chunks of one stream may be merged: compare the concatenated text, in order, per kind.
    flattened = "".join(text if kind != "display" else f"<{text}>" for kind, text in seen)
    assert flattened == "0\n1\n2\n3\nwarn\n<shown>last\n"
    assert ("stderr", "warn\n") in seen
    assert result.text.startswith("0\n1\n2\n3\nwarn\n") and result.text.endswith("last\n")


async def test_output_a_cell_ends_on_is_never_overtaken_by_its_end(kernel: AsyncKernel) -> None:
    # every MiB goes to ipykernel's IO thread at once and the flushes at a cell's end skip what
    # has nothing buffered; the last MiB, still being sent when the cell ends, must come first
    # (it came after the end in about 1 of 40 runs when a flush did not see it)
    size = 3 << 20
    for run in range(60):
        execution = kernel.stream(f"line = 'x' * 1023\nfor _ in range({size >> 10}):\n    print(line)")
        received = 0
        async for event in execution:
            if isinstance(event, t.OutputNotification):
                received += len(event.text)
        assert (await execution.result()).status == "ok"
        assert received == size, run


async def test_a_late_consumer_loses_no_event(kernel: AsyncKernel) -> None:
    execution = kernel.stream("for i in range(5):\n    print(i, flush=True)")
    result = await execution.result()
    text = "".join([e.text async for e in execution if isinstance(e, t.OutputNotification)])
    assert text == result.text == "0\n1\n2\n3\n4\n"
    assert [e async for e in execution] == []  # the end stays the end


async def test_kernel_state_follows_kernel_status(client: AsyncClient, kernel: AsyncKernel) -> None:
    states: list[t.KernelState] = []
    idle_again = asyncio.Event()

    def on_status(params: t.KernelStatusNotification) -> None:
        if params.kernel_id == kernel.kernel_id:
            states.append(params.state)
            if params.state == "idle" and "busy" in states:
                idle_again.set()

    client.on_notification(methods.KERNEL_STATUS, on_status)
    await kernel.execute("1")
    await asyncio.wait_for(idle_again.wait(), 10)
    assert kernel.state == "idle"


async def test_restart_clears_the_state(kernel: AsyncKernel) -> None:
    await kernel.execute("y = 1")
    await kernel.restart()
    result = await kernel.execute("y")
    assert result.status == "error"
    assert result.error is not None and result.error.ename == "NameError"


async def test_interrupt_stops_a_running_cell(kernel: AsyncKernel) -> None:
    execution = kernel.stream("import time\nprint('started', flush=True)\ntime.sleep(30)")
    await anext(aiter(execution))
    started = time.monotonic()
    await kernel.interrupt()
    result = await execution.result()
    assert time.monotonic() - started < 10
    assert result.status == "error"
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"


async def test_the_daemon_timeout_interrupts_and_keeps_the_output(kernel: AsyncKernel) -> None:
    result = await kernel.execute("import time\nprint('before', flush=True)\ntime.sleep(30)", timeout=1)
    assert result.status == "timeout"
    assert "before" in result.text
    assert (await kernel.execute("print('usable')")).text == "usable\n"


async def test_cancel_gives_the_partial_result_quickly(kernel: AsyncKernel) -> None:
    execution = kernel.stream("import time\nprint('started', flush=True)\ntime.sleep(30)")
    first = await anext(aiter(execution))
    assert isinstance(first, t.OutputNotification) and first.text == "started\n"
    started = time.monotonic()
    result = await execution.cancel()
    assert time.monotonic() - started < 10
    assert result.status == "cancelled"
    assert result.execution_id == execution.execution_id
    assert result.text == "started\n"
    assert (await kernel.execute("print('after')")).text == "after\n"


async def test_giving_up_waiting_for_a_stream_does_not_cancel_it(kernel: AsyncKernel) -> None:
    execution = kernel.stream("import time\ntime.sleep(1.5)\nprint('done')")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(execution.result(), 0.2)
    result = await execution.result()
    assert (result.status, result.text) == ("ok", "done\n")


async def test_cancelling_the_awaiting_task_cancels_the_execution(kernel: AsyncKernel) -> None:
    task = asyncio.create_task(kernel.execute("import time\ntime.sleep(30)"))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Executes on one kernel run in arrival order: this one waits for the sleep unless cancelled.
    started = time.monotonic()
    result = await kernel.execute("print('next')", timeout=20)
    assert result.text == "next\n"
    assert time.monotonic() - started < 10


async def test_a_cancelled_execute_error_carries_the_partial_result(
    client: AsyncClient, kernel: AsyncKernel
) -> None:
    params = t.ExecuteParams(
        kernel_id=kernel.kernel_id, code="import time\ntime.sleep(30)", execution_id="tag"
    )
    request_id, future = client._send_request(methods.EXECUTE, params)
    await asyncio.sleep(1)
    client._cancel_request(request_id)
    with pytest.raises(RequestCancelled) as caught:
        await client._wait(request_id, future)
    assert caught.value.data is not None
    assert caught.value.data["result"]["status"] == "cancelled"
    assert caught.value.data["result"]["executionId"] == "tag"


# --- sandboxes, packages, skills -----------------------------------------------------------


async def test_sandbox_env_reaches_the_kernel(client: AsyncClient) -> None:
    async with (
        await client.create_sandbox("local", env={"API_KEY": "x-123"}) as sandbox,
        await sandbox.start_kernel() as kernel,
    ):
        result = await kernel.execute("import os\nprint(os.environ['API_KEY'])")
    assert result.text == "x-123\n"


async def test_list_and_destroy_sandboxes(client: AsyncClient) -> None:
    sandbox = await client.create_sandbox("local", name="listed")
    kernel = await sandbox.start_kernel()
    (info,) = [s for s in await client.list_sandboxes() if s.sandbox_id == sandbox.sandbox_id]
    assert (info.name, info.backend, info.kernels) == ("listed", "local", [kernel.kernel_id])
    await sandbox.destroy()
    assert sandbox.sandbox_id not in [s.sandbox_id for s in await client.list_sandboxes()]
    with pytest.raises(SandboxNotFound):
        await sandbox.start_kernel()
    with pytest.raises(KernelNotFound):
        await kernel.execute("1")


async def test_install_a_package_then_import_it(sandbox: AsyncSandbox) -> None:
    progress: list[str] = []
    installed = await sandbox.install([PACKAGE], on_progress=progress.append)
    assert t.InstalledPackage(name="cowsay", version="6.1") in installed
    assert progress and all(isinstance(line, str) for line in progress)
    async with await sandbox.start_kernel() as kernel:
        result = await kernel.execute(f"import {MODULE}\nprint({MODULE}.__name__)")
    assert result.text == f"{MODULE}\n"


async def test_a_failed_install_carries_the_log(sandbox: AsyncSandbox) -> None:
    with pytest.raises(InstallFailed) as caught:
        await sandbox.install("cellbox-surely-no-such-package-4d1c==0.0.1")
    assert caught.value.data is not None and caught.value.data["log"]


async def test_skill_sources_of_a_workspace_module(sandbox: AsyncSandbox) -> None:
    source = '"""Weather."""\n\nprint("never run")\n\n\ndef forecast() -> str:\n    return "sunny"\n'
    skills = Path(sandbox.workspace) / "skills"
    skills.mkdir(exist_ok=True)
    (skills / "weather_skill.py").write_text(source)
    result = await sandbox.skill_sources(["weather_skill"])
    assert result.sources == {"weather_skill": source}
    assert result.formatted == f"```python\n# Module: weather_skill\n\n{source}\n```"
    with pytest.raises(ModuleNotFound) as caught:
        await sandbox.skill_sources(["weather_skill", "no_such_skill_module"])
    assert caught.value.data == {"module": "no_such_skill_module"}


# --- the daemon going away -----------------------------------------------------------------


async def test_a_killed_daemon_fails_the_pending_request_promptly(
    client: AsyncClient, kernel: AsyncKernel
) -> None:
    execution = kernel.stream("import time\nprint('started', flush=True)\ntime.sleep(60)")
    await anext(aiter(execution))
    pending = asyncio.create_task(kernel.execute("1"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    os.kill(client.pid, signal.SIGKILL)
    with pytest.raises(TransportError):
        await pending
    with pytest.raises(TransportError):
        await execution.result()
    with pytest.raises(TransportError):
        _ = [event async for event in execution]
    assert time.monotonic() - started < 5
    with pytest.raises(TransportError):
        await client.list_sandboxes()


async def test_a_missing_daemon_command_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot start"):
        async with AsyncClient(["/nonexistent/cellbox", "serve"]):
            pass


async def test_a_daemon_that_exits_at_once_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="exited with code 3"):
        async with AsyncClient([sys.executable, "-c", "raise SystemExit(3)"]):
            pass


# --- the sync twin -------------------------------------------------------------------------


def test_sync_client_end_to_end(sync_client: Client) -> None:
    with sync_client.create_sandbox("local") as sandbox, sandbox.start_kernel() as kernel:
        assert kernel.execute("z = 2").status == "ok"
        execution = kernel.stream("for i in range(3):\n    print(i * z, flush=True)")
        texts = [event.text for event in execution if isinstance(event, t.OutputNotification)]
        assert "".join(texts) == "0\n2\n4\n"
        assert execution.result().text == "0\n2\n4\n"
        error = kernel.execute("1 / 0")
        assert error.status == "error" and error.error is not None
        assert error.error.ename == "ZeroDivisionError"
        assert any("ZeroDivisionError" in line for line in error.error.traceback)
        assert kernel.state in ("idle", "busy")
        assert [s.sandbox_id for s in sync_client.list_sandboxes()] == [sandbox.sandbox_id]


def test_sync_cancel(sync_client: Client) -> None:
    with sync_client.create_sandbox("local") as sandbox, sandbox.start_kernel() as kernel:
        execution = kernel.stream("import time\nprint('started', flush=True)\ntime.sleep(30)")
        assert next(execution) == t.OutputNotification(
            execution_id=execution.execution_id, kernel_id=kernel.kernel_id, stream="stdout", text="started\n"
        )
        started = time.monotonic()
        result = execution.cancel()
        assert result.status == "cancelled" and result.text == "started\n"
        assert time.monotonic() - started < 10
        assert list(execution) == []


def test_sync_skill_sources_and_errors(sync_client: Client) -> None:
    with sync_client.create_sandbox("local") as sandbox:
        (Path(sandbox.workspace) / "skills").mkdir(exist_ok=True)
        (Path(sandbox.workspace) / "skills" / "tiny_skill.py").write_text("X = 1\n")
        assert sandbox.skill_sources("tiny_skill").sources == {"tiny_skill": "X = 1\n"}
        with pytest.raises(ModuleNotFound):
            sandbox.skill_sources("missing_skill")


def test_sync_killed_daemon_is_a_transport_error(sync_client: Client) -> None:
    kernel = sync_client.create_sandbox("local").start_kernel()
    execution = kernel.stream("import time\nprint('started', flush=True)\ntime.sleep(60)")
    next(execution)
    os.kill(sync_client.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(TransportError):
        execution.result()
    assert time.monotonic() - started < 5
    with pytest.raises(TransportError):
        kernel.execute("1")
