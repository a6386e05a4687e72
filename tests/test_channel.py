"""The daemon's end of a sandbox's channel, in-process: whatever bytes an agent sends (the
sandbox's code can be the agent), the channel ends cleanly or goes on, and never raises out of
its link's callbacks or hangs a call. The end-to-end behaviour is test_docker's and
test_execute's, with real agents."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import pytest

from cellboxd import channel as ch
from cellboxd.sandbox import outputs, wire


class _Link:
    """A link whose writes are kept (what the daemon sent the agent)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def _event(obj: object, blob: bytes = b"") -> bytes:
    return wire.json_frame(wire.EVENT, 0, obj, blob)


async def _started() -> tuple[ch.Channel, _Link]:
    channel, link = ch.Channel("test"), _Link()
    starting = asyncio.ensure_future(channel.start(link, b"agent"))
    await asyncio.sleep(0)
    channel.feed(_event({"event": "hello", "pid": 1}))
    assert (await starting)["pid"] == 1
    return channel, link


def _hostile() -> Iterator[bytes]:
    deep = b"[" * 100_000 + b"]" * 100_000
    yield struct.pack("!IBII", 9 + len(deep), wire.EVENT, 0, len(deep)) + deep  # nested too deep
    yield wire.frame(wire.EVENT, 0, struct.pack("!I", 2) + b"\xff\xfe")  # not UTF-8, not JSON
    yield wire.frame(wire.EVENT, 0, struct.pack("!I", 99) + b"{}")  # JSON shorter than it says
    yield wire.json_frame(wire.EVENT, 0, [1, 2, 3])  # not an object
    yield wire.frame(wire.CALL, 7, b"")  # a type the agent does not send
    yield wire.frame(wire.KERNEL, 1, b"")  # an empty kernel frame
    yield struct.pack("!IBI", wire.MAX_FRAME + 1, wire.EVENT, 0)  # larger than any frame


@pytest.mark.parametrize("data", list(_hostile()), ids=lambda d: d[:12].hex())
async def test_bytes_that_break_the_framing_end_the_channel_and_its_calls(data: bytes) -> None:
    channel, link = await _started()
    call = asyncio.ensure_future(channel.call("file.read", path="x"))
    await asyncio.sleep(0)
    channel.feed(data)  # raises nothing
    assert channel.closed.done() and "framing" in channel.closed.result()
    assert link.closed
    with pytest.raises(ch.ChannelClosed):
        await asyncio.wait_for(call, 1)


def _answer(link: _Link, result: dict, blob: bytes = b"") -> bytes:
    """The REPLY to the last call the daemon sent."""
    (sent,) = [data for data in link.written if data[4] == wire.CALL][-1:]
    ident = struct.unpack_from("!I", sent, 5)[0]
    return wire.json_frame(wire.REPLY, ident, result, blob)


async def test_events_of_the_wrong_shape_are_ignored_and_the_channel_goes_on() -> None:
    channel, link = await _started()
    call = asyncio.ensure_future(channel.call("file.read", path="x"))
    await asyncio.sleep(0)
    for event in (
        {},
        {"event": 3},
        {"event": "exit", "kernel": "x", "code": "y"},
        {"event": "output", "run": []},
    ):
        channel.feed(_event(event))
    channel.feed(wire.json_frame(wire.REPLY, 12345, {"ok": True}))  # a call nobody made
    channel.feed(wire.kernel_frame(99, 1, [b"to a kernel nobody started"]))
    channel.feed(_answer(link, {"ok": True, "size": 2}, b"hi"))
    assert await asyncio.wait_for(call, 1) == ({"ok": True, "size": 2}, b"hi")
    assert not channel.closed.done()


async def test_a_paused_channel_does_not_time_its_calls_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the daemon does not read the agent (its kernels' messages wait to be taken), a call's
    answer may be behind them: its deadline waits; an agent that does not answer still goes."""
    channel, link = await _started()
    starting = asyncio.ensure_future(channel.start_kernel(["python"], "key", {}, "k-test"))
    await asyncio.sleep(0)
    channel.feed(_answer(link, {"ok": True, "pid": 5}))
    port, pid = await starting  # a kernel whose messages nobody takes
    assert pid == 5
    monkeypatch.setattr(ch, "CALL_TIMEOUT", 0.05)
    piece = b"x" * (outputs.MESSAGE_BOUND - 64)
    for _ in range(ch.HIGH_WATER // len(piece) + 1):
        channel.feed(wire.kernel_frame(1, 1, [piece]))
    assert link.paused
    call = asyncio.ensure_future(channel.call("file.read", path="x"))
    await asyncio.sleep(0.2)  # four deadlines
    assert not call.done() and not channel.closed.done()
    port.close()  # the messages are let go: reading resumes, and the deadline counts again
    assert not link.paused
    with pytest.raises(ch.ChannelClosed, match=r"did not answer file\.read"):
        await asyncio.wait_for(call, 1)
