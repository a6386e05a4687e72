"""`cellbox mcp` as a subprocess, driven by the MCP SDK's own client over stdio and streamable HTTP."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx2
import mcp_types as mt
import pytest
import pytest_asyncio
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from cellbox import types as t
from cellboxd import mcpconfig

# The tests of the shared session run in the event loop of its fixture.
shared_loop = pytest.mark.asyncio(loop_scope="module")

MCP = [sys.executable, "-m", "cellboxd", "mcp"]
MAX_OUTPUT = 2000
# Surely not installed in the daemon's environment; pure Python and small (as in test_client).
PACKAGE, MODULE = "cowsay==6.1", "cowsay"
TOOLS = {
    "execute_python",
    "install_packages",
    "get_skill_sources",
    "read_file",
    "write_file",
    "list_files",
    "restart_kernel",
}


# --- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def entered(client: Client) -> AsyncIterator[Client]:
    """`client`, entered and left in a task of its own: anyio's scopes must be left in the task
    that entered them, and pytest-asyncio sets a fixture up and tears it down in different ones."""
    ready, stop = asyncio.Event(), asyncio.Event()

    async def own() -> None:
        async with client:
            ready.set()
            await stop.wait()

    task = asyncio.create_task(own())
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()
    try:
        yield client
    finally:
        stop.set()
        await task


def stdio(*args: str, stderr: IO[str], **kwargs: Any) -> Client:
    server = StdioServerParameters(command=sys.executable, args=[*MCP[1:], *args], env=dict(os.environ))
    return Client(stdio_client(server, errlog=stderr), **kwargs)


def text(result: mt.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, mt.TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> mt.CallToolResult:
    return await client.call_tool(tool, arguments)


async def ok(client: Client, tool: str, **arguments: Any) -> str:
    result = await call(client, tool, **arguments)
    assert not result.is_error, text(result)
    return text(result)


async def workspace(client: Client) -> Path:
    """The session's workspace on this machine (local backend): the kernel's working directory."""
    return Path(ast.literal_eval(await ok(client, "execute_python", code="import os; os.getcwd()")))


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def daemon_pid(workspace: Path) -> int:
    """The PID of the daemon that made the sandbox of `workspace`, from its owner file."""
    pid: int = json.loads((workspace.parent / "owner.json").read_text())["pid"]
    return pid


class HttpServer:
    """`cellbox mcp --http` on a free port of loopback, with its stderr collected."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*MCP, "--http", "127.0.0.1:0", *args], stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._url = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._url.wait(60), "".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving MCP at" in line:
                self.url = line.rsplit(" ", 1)[1].strip()
                self._url.set()

    def client(self, token: str, **kwargs: Any) -> tuple[httpx2.AsyncClient, Client]:
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=300)
        )
        return http, Client(streamable_http_client(self.url, http_client=http), **kwargs)

    def stop(self) -> None:
        """SIGTERM: the server ends its sessions and stops its daemon, then exits by that signal."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == -signal.SIGTERM
        assert "Traceback" not in "".join(self.lines), "".join(self.lines)


class RawStdio:
    """`cellbox mcp` on stdio spoken to line by line, for the tests that need its process."""

    def __init__(self, stderr: IO[str]) -> None:
        self.proc = subprocess.Popen(
            MCP, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        self._ids = 0
        self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdout is not None
        self._ids += 1
        self.send({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params})
        while line := self.proc.stdout.readline():
            message = json.loads(line)
            if message.get("id") == self._ids and "method" not in message:
                result: dict[str, Any] = message["result"]
                return result
        raise AssertionError("cellbox mcp closed its output")

    def workspace(self) -> Path:
        result = self.request(
            "tools/call", {"name": "execute_python", "arguments": {"code": "import os; os.getcwd()"}}
        )
        return Path(ast.literal_eval(result["content"][0]["text"]))


# --- fixtures ------------------------------------------------------------------------------


class Notifications:
    def __init__(self) -> None:
        self.logs: list[mt.LoggingMessageNotificationParams] = []

    async def on_log(self, params: mt.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)


@pytest.fixture(scope="module")
def notifications() -> Notifications:
    return Notifications()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(
    notifications: Notifications, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Client]:
    """One stdio server and session for the tests that do not need their own."""
    with (tmp_path_factory.mktemp("mcp") / "stderr").open("w") as stderr:
        client = stdio(
            "--max-output-chars", str(MAX_OUTPUT), stderr=stderr, logging_callback=notifications.on_log
        )
        async with entered(client):
            yield client


TOKEN = "test-token-5b1f"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    token_file = tmp_path_factory.mktemp("mcp-http") / "token"
    token_file.write_text(f"{TOKEN}\n")
    server = HttpServer("--token-file", str(token_file))
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def http_session(server: HttpServer, **kwargs: Any) -> AsyncIterator[Client]:
    http, client = server.client(TOKEN, **kwargs)
    async with http, client:
        yield client


# --- stdio ---------------------------------------------------------------------------------


@shared_loop
async def test_the_tools_are_listed_with_schemas_and_descriptions(session: Client) -> None:
    assert session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
    tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    assert all(tool.description for tool in tools.values())
    assert tools["execute_python"].input_schema["required"] == ["code"]
    assert "persist" in (tools["execute_python"].description or "")
    assert tools["read_file"].annotations is not None and tools["read_file"].annotations.read_only_hint


@shared_loop
async def test_state_persists_across_calls(session: Client) -> None:
    await ok(session, "execute_python", code="answer = 6 * 7")
    assert await ok(session, "execute_python", code="print('the answer:', answer)\nanswer + 1") == (
        "the answer: 42\n43"
    )


@shared_loop
async def test_output_streams_as_progress_when_asked(session: Client) -> None:
    messages: list[str | None] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message)

    code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.05)"
    result = await session.call_tool("execute_python", {"code": code}, progress_callback=progress)
    assert text(result) == "line 0\nline 1\nline 2"
    assert "".join(m or "" for m in messages) == "line 0\nline 1\nline 2\n"


@shared_loop
async def test_output_streams_as_log_messages_without_a_progress_token(
    session: Client, notifications: Notifications
) -> None:
    notifications.logs.clear()
    await ok(session, "execute_python", code="import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert [(log.logger, log.data) for log in notifications.logs] == [
        ("stdout", "out\n"),
        ("stderr", "err\n"),
    ]


@shared_loop
async def test_an_image_comes_back_as_image_content(session: Client) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    result = await call(session, "execute_python", code=code)
    assert not result.is_error, text(result)
    images = [block for block in result.content if isinstance(block, mt.ImageContent)]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    saved = text(result).split("[display saved as ")[1].split("]")[0]
    assert saved.startswith("images/") and saved.endswith(".png")
    again = await call(session, "read_file", path=saved)
    assert again.content == [mt.ImageContent(type="image", data=images[0].data, mime_type="image/png")]


@shared_loop
async def test_an_exception_is_an_error_with_its_traceback(session: Client) -> None:
    result = await call(
        session, "execute_python", code="print('before')\ndef f():\n    raise KeyError('gone')\nf()"
    )
    assert result.is_error
    assert text(result).startswith("before\n")
    assert "Traceback" in text(result) and "KeyError: 'gone'" in text(result)
    assert "\x1b[" not in text(result)


@shared_loop
async def test_a_long_output_is_cut_and_says_so(session: Client) -> None:
    answer = await ok(session, "execute_python", code="print('a' * 5000 + 'END')")
    assert len(answer) < MAX_OUTPUT + 200
    assert answer.startswith("a" * 100) and answer.endswith("END")
    assert "characters cut here: the output had 5,003, more than 2,000" in answer


@shared_loop
async def test_a_timeout_interrupts_and_keeps_the_state(session: Client) -> None:
    await ok(session, "execute_python", code="kept = 'yes'")
    result = await call(session, "execute_python", code="import time\ntime.sleep(30)", timeout=0.5)
    assert result.is_error and "[timeout: the execution did not finish within 0.5 s" in text(result)
    assert await ok(session, "execute_python", code="kept") == "'yes'"


@shared_loop
async def test_cancelling_the_call_interrupts_the_cell(session: Client) -> None:
    started = asyncio.Event()

    async def progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    code = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)"
    running = asyncio.create_task(
        session.call_tool("execute_python", {"code": code}, progress_callback=progress)
    )
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    # the kernel is free again: this would wait for the sleep otherwise
    assert await asyncio.wait_for(ok(session, "execute_python", code="'free'"), 20) == "'free'"


@shared_loop
async def test_install_a_package_and_import_it(session: Client) -> None:
    assert PACKAGE in await ok(session, "install_packages", packages=[PACKAGE])
    assert await ok(session, "execute_python", code=f"import {MODULE}\n{MODULE}.__version__") == "'6.1'"
    result = await call(session, "install_packages", packages=["cellbox-surely-no-such-package-4d1c==0.0.1"])
    assert result.is_error and "cellbox-surely-no-such-package-4d1c" in text(result)


@shared_loop
async def test_files_are_written_read_and_listed(session: Client) -> None:
    assert await ok(session, "write_file", path="notes/today.txt", content="naïve\n") == (
        "Wrote 7 bytes to notes/today.txt."
    )
    assert await ok(session, "read_file", path="notes/today.txt") == "naïve\n"
    assert await ok(session, "execute_python", code="open('notes/today.txt').read()") == "'naïve\\n'"
    await ok(session, "execute_python", code="open('notes/blob.bin', 'wb').write(bytes(range(256)))")
    assert "notes/blob.bin is a binary file" in await ok(session, "read_file", path="notes/blob.bin")
    assert (await ok(session, "list_files", path="notes")).splitlines() == [
        "notes/blob.bin  256 bytes",
        "notes/today.txt  7 bytes",
    ]
    missing = await call(session, "read_file", path="notes/none.txt")
    assert missing.is_error and "notes/none.txt" in text(missing)
    outside = await call(session, "read_file", path="../owner.json")
    assert outside.is_error and "out of the workspace" in text(outside)


@shared_loop
async def test_a_long_file_is_cut_and_says_so(session: Client) -> None:
    await ok(session, "write_file", path="long.txt", content="é" * 3000)
    answer = await ok(session, "read_file", path="long.txt")
    assert answer.startswith("é" * MAX_OUTPUT) and "only its first 2,000 characters are shown" in answer


@shared_loop
async def test_sources_of_a_skill_module(session: Client) -> None:
    await ok(session, "write_file", path="skills/greet.py", content="def hi():\n    return 'hi'\n")
    assert await ok(session, "get_skill_sources", modules=["greet"]) == (
        "```python\n# Module: greet\n\ndef hi():\n    return 'hi'\n\n```"
    )
    missing = await call(session, "get_skill_sources", modules=["surely_no_such_module_4d1c"])
    assert missing.is_error and "surely_no_such_module_4d1c" in text(missing)


@shared_loop
async def test_bad_arguments_are_a_tool_error(session: Client) -> None:
    result = await call(session, "execute_python", code="1", timeout=-1)
    assert result.is_error and "timeout" in text(result)
    result = await call(session, "execute_python", source="1")
    assert result.is_error and "code" in text(result)


def test_closing_stdin_removes_the_sandbox_and_stops_the_daemon(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stderr:
        raw = RawStdio(stderr)
        root = raw.workspace().parent
        daemon = daemon_pid(root / "workspace")
        assert raw.proc.stdin is not None
        raw.proc.stdin.close()
        assert raw.proc.wait(30) == 0
    assert not root.exists()
    assert not alive(daemon)


def test_a_killed_server_leaves_no_daemon_and_no_sandbox(tmp_path: Path) -> None:
    """The daemon runs in a session of its own, out of the server's process group: it goes
    because its input ends with the server, and takes its sandboxes along."""
    with (tmp_path / "stderr").open("w") as stderr:
        raw = RawStdio(stderr)
        root = raw.workspace().parent
        daemon = daemon_pid(root / "workspace")
        assert alive(daemon) and os.getpgid(daemon) != os.getpgid(raw.proc.pid)
        raw.proc.kill()
        raw.proc.wait(30)
        wait_until(lambda: not alive(daemon))
    assert not root.exists()


# --- streamable HTTP -----------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN])
async def test_http_without_the_token_is_refused(http_server: HttpServer, authorization: str | None) -> None:
    headers = {"Accept": "application/json, text/event-stream"}
    if authorization is not None:
        headers["Authorization"] = authorization
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    async with httpx2.AsyncClient() as http:
        response = await http.post(http_server.url, json=initialize, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        headers["Authorization"] = f"Bearer {TOKEN}"
        assert (await http.post(http_server.url, json=initialize, headers=headers)).status_code == 200


async def test_http_sessions_have_sandboxes_of_their_own(http_server: HttpServer) -> None:
    async with http_session(http_server) as first, http_session(http_server) as second:
        assert first.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS  # it tried 2026-07-28 first
        assert {tool.name for tool in (await first.list_tools()).tools} == TOOLS
        await ok(first, "execute_python", code="mine = 1")
        named = await call(second, "execute_python", code="mine")
        assert named.is_error and "NameError" in text(named)
        assert await workspace(first) != await workspace(second)


async def test_restart_clears_the_kernel_but_not_the_files(http_server: HttpServer) -> None:
    async with http_session(http_server) as client:
        assert "No kernel was running" in await ok(client, "restart_kernel")
        await ok(client, "execute_python", code="state = 1\nopen('kept.txt', 'w').write('kept')")
        assert "restarted" in await ok(client, "restart_kernel")
        gone = await call(client, "execute_python", code="state")
        assert gone.is_error and "NameError" in text(gone)
        assert await ok(client, "read_file", path="kept.txt") == "kept"


async def test_a_session_that_ends_takes_its_sandbox_along(http_server: HttpServer) -> None:
    async with http_session(http_server) as client:
        root = (await workspace(client)).parent
        assert root.is_dir()
    await asyncio.to_thread(wait_until, lambda: not root.exists())


async def test_a_generated_token_is_printed_once_and_the_stop_ends_the_sessions() -> None:
    server = HttpServer()
    try:
        printed = [line for line in server.lines if "bearer token:" in line]
        assert len(printed) == 1
        http, client = server.client(printed[0].rsplit(" ", 1)[1].strip())
        async with http, client:
            root = (await workspace(client)).parent
            daemon = daemon_pid(root / "workspace")
            await asyncio.to_thread(server.stop)
            assert not root.exists() and not alive(daemon)
    finally:
        if server.proc.returncode is None:
            server.stop()


# --- MCP servers for the kernel's code -----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[]", 'expected an object {"mcpServers"'),
        ('{"mcpServers": {"my-server": {"command": "x"}}}', "mcpServers.my-server: the name must be"),
        ('{"mcpServers": {"s": {"command": "x", "url": "http://h"}}}', "mcpServers.s: give either `command`"),
        (
            '{"mcpServers": {"s": {"command": "x", "arg": []}}}',
            "mcpServers.s: Object contains unknown field `arg`",
        ),
        ('{"mcpServers": {"s": {"url": "ftp://h"}}}', "mcpServers.s: Expected `str` matching regex"),
        ('{"mcpServers": {"s": {"type": "sse", "url": "http://h"}}}', "`type` 'sse' is not served"),
        ('{"mcpServers": {"s": {"type": "http", "command": "x"}}}', "of `type` 'http' needs `url`"),
        ('{"mcpServers": {"s": {"command": "x", "approval": "always"}}}', "`approval` is 'ask' or 'never'"),
        ("{", "is not JSON"),
    ],
)
def test_a_bad_mcp_config_is_refused_naming_the_entry(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(config)
    with pytest.raises(mcpconfig.McpConfigError) as refused:
        mcpconfig.load(path)
    assert message in str(refused.value) and str(path) in str(refused.value)


def test_mcp_config_entries_of_both_kinds(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    config = {
        "local": {
            "type": "stdio",
            "command": "tool",
            "args": ["--x"],
            "env": {"K": "v"},
            "approval": "never",
        },
        "remote": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer t"}},
    }
    path.write_text(json.dumps({"mcpServers": config}))
    servers = mcpconfig.load(path)
    assert servers["local"] == mcpconfig.ConfiguredServer(
        t.McpServerSpec(command="tool", args=["--x"], env={"K": "v"}), "never"
    )
    assert (
        servers["remote"].spec.headers == {"Authorization": "Bearer t"}
        and servers["remote"].approval == "ask"
    )


def test_bad_options_exit_2_before_serving(tmp_path: Path) -> None:
    (tmp_path / "mcp.json").write_text('{"mcpServers": {"my-server": {"command": "x"}}}')
    for args, message in [
        (["--mcp-config", str(tmp_path / "mcp.json")], "mcpServers.my-server: the name must be"),
        (["--token-file", str(tmp_path)], "--token-file is for --http"),
        (["--http", "localhost:http"], "expected [HOST:]PORT"),
        (["--max-output-chars", "0"], "positive"),
    ]:
        done = subprocess.run([*MCP, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr


CLOCK_CALL = (
    "from mcptools.clock.get_current_time import get_current_time\n"
    "print(get_current_time(timezone='UTC')['timezone'])"
)


async def test_code_calls_a_configured_server_when_the_user_approves(tmp_path: Path) -> None:
    """The user of a client that can be asked (elicitation) approves or refuses each call; a
    client that cannot be asked gets every call refused."""
    clock = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"clock": clock}}))
    (tmp_path / "token").write_text(TOKEN)
    server = HttpServer("--mcp-config", str(tmp_path / "mcp.json"), "--token-file", str(tmp_path / "token"))
    asked: list[str] = []
    answers = iter([True, False])

    async def elicit(ctx: ClientRequestContext, params: mt.ElicitRequestParams) -> mt.ElicitResult:
        asked.append(params.message)
        return mt.ElicitResult(action="accept", content={"approve": next(answers)})

    try:
        async with (
            http_session(server, elicitation_callback=elicit) as client,
            http_session(server) as unasked,
        ):
            result = await call(client, "execute_python", code=CLOCK_CALL)
            if "cellbox/registerMcpServer" in text(result) or "Method Not Found" in text(result):
                pytest.skip(f"the daemon does not register MCP servers yet: {text(result)}")
            assert text(result) == "UTC" and not result.is_error
            assert "get_current_time" in asked[0] and "clock" in asked[0] and '"UTC"' in asked[0]
            refused = await call(client, "execute_python", code=CLOCK_CALL)
            assert refused.is_error and "ToolCallRejected" in text(refused)
            refused = await call(unasked, "execute_python", code=CLOCK_CALL)
            assert refused.is_error and "ToolCallRejected" in text(refused)
            assert len(asked) == 2
    finally:
        server.stop()
