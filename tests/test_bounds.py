"""Whatever a kernel sends, however big, the daemon holds a bounded amount of it: huge displays,
images, tracebacks and raw messages, and floods of small displays, each with the daemon's peak
RSS read from /proc; and while sandboxes flood, the others and the daemon itself are served."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellbox import AsyncClient
from cellboxd.sandbox.outputs import MESSAGE_BOUND
from tests.bench import procfs
from tests.rpc import Daemon

PEAK_MB = 200
CAP = 1_000_000  # the daemon's default text cap

# a message the kernel sends as it is, past its streams' bounds (the sandbox's code can)
RAW = "k = get_ipython().kernel\nk.session.send(k.iopub_socket, {kind!r}, {content}, parent=k.get_parent())\n"


@pytest.fixture(scope="module")
def bounded(cellbox_home: Path) -> Iterator[tuple[Daemon, str, Path]]:
    """A daemon of the module's own, so that its peak is this module's; a kernel; its workspace."""
    with Daemon() as d:
        created = d.request("cellbox/createSandbox", {})
        kernel = d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]})["kernelId"]
        yield d, kernel, Path(created["workspace"])


def _run(d: Daemon, kernel: str, code: str, execution_id: str) -> tuple[dict, float]:
    """The result of `code`, and the daemon's peak RSS in MiB while it ran."""
    assert procfs.reset_peak(d.proc.pid), "VmHWM cannot be reset here"
    result = d.request(
        "cellbox/execute", {"kernelId": kernel, "code": code, "executionId": execution_id}, 300
    )
    return result, procfs.peak_mb(d.proc.pid)


def _displays(d: Daemon, execution_id: str) -> list[dict]:
    found = [n for n in d.notes("cellbox/display") if n["executionId"] == execution_id]
    d.notifications.clear()
    return found


def test_a_150_mb_display_is_cut_and_the_daemon_stays_small(bounded: tuple[Daemon, str, Path]) -> None:
    d, kernel, _ = bounded
    code = "display({'text/plain': 'x' * 150_000_000, 'text/html': '<b>small</b>'}, raw=True)"
    result, peak = _run(d, kernel, code, "ex-huge-display")
    assert result["status"] == "ok" and result["truncated"] is True
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    (shown,) = _displays(d, "ex-huge-display")
    assert 0 < len(shown["data"]["text/plain"]) < MESSAGE_BOUND and set(shown["data"]["text/plain"]) == {"x"}
    assert sum(len(v) for o in result["outputs"] for v in o["data"].values()) <= CAP


def test_a_150_mb_image_stays_a_file_and_the_daemon_stays_small(bounded: tuple[Daemon, str, Path]) -> None:
    d, kernel, workspace = bounded
    code = (
        "import hashlib, os\nfrom IPython.display import Image, display\n"
        "png = b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(110_000_000)\n"
        "display(Image(data=png, format='png'))\nhashlib.sha256(png).hexdigest()"
    )
    result, peak = _run(d, kernel, code, "ex-huge-image")
    assert result["status"] == "ok", result.get("error")
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    shown, digest_shown = _displays(d, "ex-huge-image")  # the image, then the cell's value
    assert "image/png" not in shown["data"] and shown["file"].startswith(f"images/{kernel}-")
    saved = workspace / shown["file"]
    assert shown["path"] == str(saved) and saved.stat().st_size == 110_000_008
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert result["text"] == digest_shown["data"]["text/plain"] + "\n" == f"'{digest}'\n"
    assert result["outputs"][0]["file"] == shown["file"]


def test_ten_thousand_displays_all_go_out_and_the_result_keeps_within_the_cap(
    bounded: tuple[Daemon, str, Path],
) -> None:
    d, kernel, _ = bounded
    code = "for i in range(10_000):\n    display({'text/plain': 'display %05d ' % i + 'y' * 200}, raw=True)"
    result, peak = _run(d, kernel, code, "ex-many")
    assert result["status"] == "ok"
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    shown = _displays(d, "ex-many")
    assert [n["data"]["text/plain"][:13] for n in shown] == [f"display {i:05d}" for i in range(10_000)]
    assert result["truncated"] is True and 0 < len(result["outputs"]) < 10_000
    assert sum(len(v) for o in result["outputs"] for v in o["data"].values()) <= CAP


def test_a_huge_traceback_is_cut_and_the_daemon_stays_small(bounded: tuple[Daemon, str, Path]) -> None:
    d, kernel, _ = bounded
    result, peak = _run(d, kernel, "raise ValueError('v' * 100_000_000)", "ex-traceback")
    assert result["status"] == "error" and result["truncated"] is True
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    error = result["error"]
    assert error["ename"] == "ValueError" and 0 < len(error["evalue"]) < MESSAGE_BOUND


def test_a_raw_60_mb_stream_message_arrives_whole_in_pieces(bounded: tuple[Daemon, str, Path]) -> None:
    d, kernel, _ = bounded
    code = RAW.format(
        kind="stream", content="{'name': 'stdout', 'text': ''.join(map(chr, range(97, 123))) * 2_400_000}"
    )
    result, peak = _run(d, kernel, code, "ex-raw-stream")
    assert result["status"] == "ok"
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    streamed = [n["text"] for n in d.notes("cellbox/output") if n["executionId"] == "ex-raw-stream"]
    d.notifications.clear()
    assert "".join(streamed) == "abcdefghijklmnopqrstuvwxyz" * 2_400_000
    assert max(map(len, streamed)) <= 1 << 20


def test_huge_unknown_and_comm_messages_are_cut_not_held(bounded: tuple[Daemon, str, Path]) -> None:
    d, kernel, _ = bounded
    code = (
        RAW.format(kind="comm_msg", content="{'comm_id': 'c', 'data': {'blob': 'z' * 80_000_000}}")
        + RAW.format(kind="no_such_type", content="{'junk': ['j' * 1000] * 80_000}")
        # a display whose message metadata (not its content's) is huge
        + RAW.format(kind="display_data", content="{'data': {'text/plain': 'm'}, 'metadata': {}}").replace(
            ")\n", ", metadata={'x': 'y' * 50_000_000})\n"
        )
        + "'still here'"
    )
    result, peak = _run(d, kernel, code, "ex-raw-other")
    assert result["status"] == "ok" and result["text"] == "'still here'\n"
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    assert [n["data"] for n in _displays(d, "ex-raw-other")] == [
        {"text/plain": "m"},
        {"text/plain": "'still here'"},
    ]
    assert d.request("cellbox/execute", {"kernelId": kernel, "code": "6 * 7"})["text"] == "42\n"


async def test_a_quiet_sandbox_and_the_daemon_answer_while_eight_others_flood(cellbox_home: Path) -> None:
    flood = (
        "from IPython.display import display\nline = 'f' * 1023\nwhile True:\n"
        "    for _ in range(2000):\n        print(line)\n"
        "    display({'text/plain': 'd' * 3_000_000}, raw=True)"
    )
    async with AsyncClient([sys.executable, "-m", "cellboxd", "serve"]) as client:
        flooders = [await (await client.create_sandbox("local")).start_kernel() for _ in range(8)]
        quiet = await (await client.create_sandbox("local")).start_kernel()
        floods = [kernel.stream(flood) for kernel in flooders]
        received = [0] * len(floods)
        flowing = asyncio.Event()

        async def take(i: int) -> None:  # a client that reads all, and throws it away
            async for event in floods[i]:
                received[i] += len(getattr(event, "text", "") or "")
                if all(received):
                    flowing.set()

        readers = [asyncio.create_task(take(i)) for i in range(len(floods))]
        await asyncio.wait_for(flowing.wait(), 120)
        # while every flood goes on: the quiet kernel's executes, and the daemon's own requests
        for n in range(20):
            assert (await quiet.execute(f"{n} + 1")).text == f"{n + 1}\n"
        assert len(await client.list_sandboxes()) == 9
        extra = await client.create_sandbox("local")
        assert (await (await extra.start_kernel()).execute("'fresh'")).text == "'fresh'\n"
        assert not any(reader.done() for reader in readers), "a flood ended by itself"
        for kernel in flooders:
            await kernel.interrupt()
        results = await asyncio.gather(*(flood.result() for flood in floods))
        await asyncio.gather(*readers)
    assert all(r.error is not None and r.error.ename == "KeyboardInterrupt" for r in results)
