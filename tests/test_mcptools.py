"""MCP servers' tools inside a sandbox: registerMcpServer, the generated `mcptools` package, calls
from cells through the daemon, and approvals, against real MCP servers (PyPI's mcp-server-time and
mcp-server-sqlite, npm's server-everything) and a hostile one of the tests' own."""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mcp_types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellbox import errors
from cellbox import types as t
from cellbox.client import Client, Sandbox
from cellboxd.mcptools import codegen
from tests.mcp_servers.hostile import BREAKOUT
from tests.rpc import Daemon

HOSTILE = [sys.executable, str(Path(__file__).parent / "mcp_servers" / "hostile.py")]
TIME = ["mcp-server-time", "--local-timezone", "UTC"]
EVERYTHING = "@modelcontextprotocol/server-everything@2026.8.31"


class Approvals:
    """The client's answers to approveToolCall: what it was asked, and how it answers."""

    def __init__(self) -> None:
        self.asked: list[t.ApproveToolCallParams] = []
        self.answer = True
        self.delay = 0.0

    def __call__(self, params: t.ApproveToolCallParams) -> bool:
        self.asked.append(params)
        time.sleep(self.delay)
        return self.answer


@pytest.fixture(scope="module")
def approvals() -> Approvals:
    return Approvals()


@pytest.fixture(scope="module")
def client(cellbox_home: Path, approvals: Approvals) -> Iterator[Client]:
    with Client(approve_tool_call=approvals) as made:
        yield made


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the hostile server's `hang` tool holds while it runs."""
    return tmp_path_factory.mktemp("hang") / "hanging"


@pytest.fixture(scope="module")
def box(client: Client, marker: Path) -> Iterator[Sandbox]:
    """A local sandbox with the hostile server (no approval) and the time server (approval)."""
    with client.create_sandbox() as sandbox:
        sandbox.register_mcp_server(
            "h",
            command=HOSTILE[0],
            args=HOSTILE[1:],
            env={"HOSTILE_SECRET": "s3cr3t-of-the-server", "HOSTILE_HANG_FILE": str(marker)},
            approval="never",
        )
        sandbox.register_mcp_server("time", command=TIME[0], args=TIME[1:])
        yield sandbox


@pytest.fixture
def kernel(box: Sandbox, approvals: Approvals) -> Iterator[object]:
    approvals.asked.clear()
    approvals.answer, approvals.delay = True, 0.0
    k = box.start_kernel()
    yield k
    k.shutdown()


# -- the generated code, in-process ------------------------------------------------------------


def _tool(name: str, description: str = "", **schema: object) -> mcp_types.Tool:
    return mcp_types.Tool(name=name, description=description, input_schema={"type": "object", **schema})


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.text(min_size=1), st.text())
def test_any_name_and_description_makes_a_module_of_the_one_shape(
    name: str, description: str, param: str, param_doc: str
) -> None:
    tool = _tool(name, description, properties={param: {"type": "string", "description": param_doc}})
    made = codegen.module("srv", tool, codegen.identifier(name))
    tree = ast.parse(made.source)  # the module's shape is checked as it is made; this parses it again
    function = tree.body[-1]
    assert isinstance(function, ast.FunctionDef) and function.name.isidentifier()
    assert [a.arg for a in function.args.kwonlyargs] == [codegen.identifier(param)]
    call = function.body[-1]
    assert isinstance(call, ast.Return) and isinstance(call.value, ast.Call)
    assert ast.literal_eval(call.value.args[1]) == name  # the tool's own name, as a literal


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_a_docstring_holds_exactly_its_text(text: str) -> None:
    kept = "".join(
        c for c in text.replace("\r\n", "\n").replace("\r", "\n") if c in "\n\t" or c.isprintable()
    )
    value = ast.literal_eval(codegen.docstring(text))
    assert value.rstrip("\n") == kept.rstrip("\n") if "\n" in kept else value == kept


def test_identifiers_are_safe_and_distinct() -> None:
    assert codegen.identifier("getCurrentTime") == "get_current_time"
    assert codegen.identifier("class") == "class_"
    assert codegen.identifier("list") == "list_"
    assert codegen.identifier("call") == "call_"
    assert codegen.identifier("match") == "match_"
    assert codegen.identifier("1st") == "n_1st"
    assert codegen.identifier("") == "tool"
    assert codegen.identifier("ünïcode-näme") == "n_code_n_me"
    assert codegen.identifier("import", ["import_"]) == "import_2"
    assert codegen.identifier(BREAKOUT) == "import_os_os_system_touch_tmp_pwned"


def test_types_and_defaults_come_from_the_schema() -> None:
    tool = _tool(
        "t",
        properties={
            "n": {"type": "integer"},
            "ratio": {"type": "number", "default": 0.5},
            "mode": {"enum": ["fast", "slow"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "maybe": {"type": ["string", "null"]},
            "thing": {"$ref": "#/$defs/Thing"},
        },
        required=["n"],
        **{"$defs": {"Thing": {"type": "boolean"}}},
    )
    source = codegen.module("srv", tool, "t").source
    assert (
        "def t(*, n: int, ratio: float = 0.5, mode: Literal['fast', 'slow'] | None = None, "
        "tags: list[str] | None = None, maybe: str | None = None, thing: bool | None = None) -> str:"
    ) in source
    assert (
        "call('srv', 't', {'n': n, 'ratio': ratio, 'mode': mode, 'tags': tags, 'maybe': maybe, "
        "'thing': thing}, ('mode', 'tags', 'maybe', 'thing'))"
    ) in source


def test_colliding_names_and_exploding_refs_stay_cheap() -> None:
    # names that all come out as `a`, and $defs whose refs multiply at each level: without the
    # allocator's counters and the types' node budget these take minutes (the test's timeout)
    tools = [_tool("a" + "!" * i) for i in range(codegen.MAX_TOOLS)]
    _, entries, skipped = codegen.package("srv", tools)
    assert len({e.function for e in entries}) == codegen.MAX_TOOLS and not skipped
    defs = {f"D{i}": {"anyOf": [{"$ref": f"#/$defs/D{i + 1}"}] * 8} for i in range(40)}
    tool = _tool("deep", properties={"x": {"$ref": "#/$defs/D0"}}, **{"$defs": defs})
    assert "x: Any" in codegen.module("srv", tool, "deep").source
    many = _tool("many", properties={f"p{i}": {"type": "string"} for i in range(codegen.MAX_PARAMS + 1)})
    assert codegen.package("srv", [many])[2] == [
        f"'many': it has {codegen.MAX_PARAMS + 1} parameters, more than 256"
    ]
    with pytest.raises(codegen.CodegenError):
        codegen.package("srv", [*tools, _tool("one too many")])


# -- through the daemon, in a local sandbox ---------------------------------------------------------


def test_register_answers_the_tools_and_getskillsources_shows_their_modules(box: Sandbox) -> None:
    result = box.register_mcp_server("time2", command=TIME[0], args=TIME[1:], approval="never")
    assert result.package == "mcptools.time2"
    assert {(x.name, x.function) for x in result.tools} == {
        ("get_current_time", "get_current_time"),
        ("convert_time", "convert_time"),
    }
    sources = box.skill_sources(["mcptools.time2.get_current_time", "mcptools.time2"])
    source = sources.sources["mcptools.time2.get_current_time"]
    assert "def get_current_time(*, timezone: str) -> dict[str, Any]:" in source
    assert "IANA timezone name" in source  # the parameter's description, in the docstring
    assert "get_current_time: Get current time" in sources.sources["mcptools.time2"]
    assert sources.formatted.startswith("```python\n# Module: mcptools.time2.get_current_time\n\n")
    box.unregister_mcp_server("time2")
    with pytest.raises(errors.ModuleNotFound):
        box.skill_sources("mcptools.time2")


def test_a_call_asks_for_approval_and_runs_the_tool(kernel, approvals: Approvals) -> None:
    code = (
        "from mcptools.time.get_current_time import get_current_time\nget_current_time(timezone='Asia/Tokyo')"
    )
    result = kernel.execute(code)
    assert result.status == "ok", result.error
    assert "'timezone': 'Asia/Tokyo'" in result.text and "'datetime': '" in result.text
    (asked,) = approvals.asked
    assert (asked.server, asked.tool, asked.arguments) == (
        "time",
        "get_current_time",
        {"timezone": "Asia/Tokyo"},
    )
    assert asked.kernel_id == kernel.kernel_id and asked.execution_id == result.execution_id


def test_a_refused_call_raises_toolcallrejected_and_the_tool_does_not_run(
    kernel, approvals: Approvals
) -> None:
    approvals.answer = False
    code = (
        "import mcptools\nfrom mcptools.time.get_current_time import get_current_time\n"
        "try:\n    get_current_time(timezone='UTC')\n"
        "except mcptools.ToolCallRejected as e:\n    print('rejected:', e)"
    )
    result = kernel.execute(code)
    assert result.text == "rejected: the call of time.get_current_time was not approved\n"


def test_time_spent_on_approval_does_not_count_against_the_timeout(kernel, approvals: Approvals) -> None:
    approvals.delay = 3.0
    code = (
        "from mcptools.time.get_current_time import get_current_time\n"
        "get_current_time(timezone='UTC')['timezone']"
    )
    result = kernel.execute(code, timeout=2)
    assert (result.status, result.text) == ("ok", "'UTC'\n")


def test_hostile_names_make_importable_modules_that_call_the_right_tools(
    kernel, approvals: Approvals
) -> None:
    code = (
        "import mcptools.h as p, pkgutil\n"
        "print(sorted(m.name for m in pkgutil.iter_modules(p.__path__)))\n"
        "from mcptools.h.import_ import import_\nfrom mcptools.h.import_2 import import_2\n"
        "from mcptools.h.list_ import list_\n"
        "print(import_(), import_2(), list_(), list is __import__('builtins').list)\n"
        "from mcptools.h import import_os_os_system_touch_tmp_pwned as m\n"
        "f = m.import_os_os_system_touch_tmp_pwned\n"
        "print(f(import_os_os_system_touch_tmp_pwned='x', print_='\"\"\"', call_=[True]))"
    )
    result = kernel.execute(code)
    assert result.status == "ok", result.error
    lines = result.text.splitlines()
    assert lines[0] == str(
        [
            "die",
            "die_soon",
            "echo",
            "fail",
            "hang",
            "import_",
            "import_2",
            "import_os_os_system_touch_tmp_pwned",
            "list_",
            "secret",
        ]
    )
    assert lines[1] == "ok import ok Import ok list True"
    assert lines[2] == repr(sorted({BREAKOUT: "x", "call": [True], "class": 3, "print": '"""'}.items()))
    assert not Path("/tmp/pwned").exists()
    assert approvals.asked == []  # registered with approval "never"


def test_structured_content_is_returned_and_optional_none_arguments_are_left_out(kernel) -> None:
    result = kernel.execute("from mcptools.h.echo import echo\necho(text='ab', times=2)")
    assert result.text == "{'echoed': 'abab'}\n"


def test_the_servers_env_stays_outside_the_sandbox(kernel) -> None:
    code = (
        "import os\nfrom mcptools.h.secret import secret\nprint(secret(), os.environ.get('HOSTILE_SECRET'))"
    )
    assert kernel.execute(code).text == "s3cr3t-of-the-server None\n"


def test_a_tool_error_raises_toolerror(kernel) -> None:
    result = kernel.execute("from mcptools.h.fail import fail\nfail()")
    assert result.error is not None
    assert (result.error.ename, result.error.evalue) == ("ToolError", "it failed, as it always does")


def test_a_server_that_dies_fails_that_call_and_is_started_again_for_the_next(kernel) -> None:
    result = kernel.execute("from mcptools.h.die import die\ndie()")
    assert result.error is not None and result.error.ename == "ToolError"
    assert (
        kernel.execute("from mcptools.h.echo import echo\necho(text='back')").text == "{'echoed': 'back'}\n"
    )


def test_a_server_that_ends_between_calls_is_started_again_for_the_next(kernel) -> None:
    code = "from mcptools.h.die_soon import die_soon\ndie_soon()\nimport time\ntime.sleep(1)"
    assert kernel.execute(code).status == "ok"
    assert (
        kernel.execute("from mcptools.h.echo import echo\necho(text='again')").text == "{'echoed': 'again'}\n"
    )


def _wait_for(path: Path, present: bool, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while path.exists() != present:
        assert time.monotonic() < deadline, f"{path} {'never came' if present else 'stayed'}"
        time.sleep(0.05)


def test_a_timeout_during_a_call_ends_the_call(kernel, marker: Path) -> None:
    result = kernel.execute("from mcptools.h.hang import hang\nhang()", timeout=3)
    assert result.status == "timeout"
    _wait_for(marker, present=False)  # the server's handler was cancelled
    assert kernel.execute("1 + 1").text == "2\n"  # the kernel went on


def test_an_interrupt_during_a_call_ends_the_call(kernel, marker: Path) -> None:
    execution = kernel.stream("from mcptools.h.hang import hang\nhang()")
    _wait_for(marker, present=True)
    kernel.interrupt()
    result = execution.result()
    assert result.error is not None and result.error.ename == "KeyboardInterrupt", result.error
    _wait_for(marker, present=False)


def test_calls_come_only_from_a_registered_server_and_tool(kernel) -> None:
    code = (
        "import mcptools\n"
        "for server, tool in (('nope', 'x'), ('h', 'nope')):\n"
        "    try:\n        mcptools.call(server, tool, {})\n"
        "    except mcptools.ToolError as e:\n        print(e)"
    )
    assert kernel.execute(code).text == (
        "no MCP server 'nope' is registered in this sandbox\nthe MCP server 'h' has no tool 'nope'\n"
    )


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """PyPI's mcp-server-sqlite, in an environment of its own: it is written for the MCP SDK 1.x,
    and servers run as their own programs, whatever SDK the daemon has."""
    venv = tmp_path_factory.mktemp("sqlite-server") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "mcp-server-sqlite==2025.4.25", "mcp>=1.6,<2"], check=True, timeout=600)
    return str(venv / "bin" / "mcp-server-sqlite")


def test_the_agent_flow_sources_for_the_prompt_then_code_that_combines_two_tools(
    box: Sandbox, kernel, tmp_path: Path, sqlite_server: str
) -> None:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (city text, amount real)")
        conn.executemany("insert into orders values (?, ?)", [("Tokyo", 5.0), ("Tokyo", 7.5), ("Paris", 2.0)])
    registered = box.register_mcp_server(
        "shop", command=sqlite_server, args=["--db-path", str(db)], approval="never"
    )
    functions = sorted(x.function for x in registered.tools)
    assert {"read_query", "list_tables", "describe_table"} <= set(functions)
    # what an agent puts in its prompt: the modules' sources
    prompt = box.skill_sources(["mcptools.shop.read_query", "mcptools.time.get_current_time"]).formatted
    assert "def read_query(*, query: str)" in prompt and "def get_current_time(*, timezone: str)" in prompt
    # the code a model writes from them: two tools, their results combined
    code = (
        "from mcptools.shop.read_query import read_query\n"
        "from mcptools.time.get_current_time import get_current_time\n"
        "rows = read_query(\n"
        "    query='select city, sum(amount) as total from orders group by city order by total desc')\n"
        "top = eval(rows)[0] if isinstance(rows, str) else rows[0]\n"
        "now = get_current_time(timezone='Asia/Tokyo')\n"
        "print(top['city'], top['total'], now['timezone'], now['datetime'][:4].isdigit())"
    )
    result = kernel.execute(code)
    assert (result.status, result.text) == ("ok", "Tokyo 12.5 Asia/Tokyo True\n"), result.error
    box.unregister_mcp_server("shop")


@pytest.mark.skipif(shutil.which("npx") is None, reason="no npx: server-everything comes from npm")
def test_server_everything_over_stdio_and_over_streamable_http(box: Sandbox, kernel) -> None:
    registered = box.register_mcp_server(
        "every", command="npx", args=["-y", EVERYTHING, "stdio"], approval="never"
    )
    assert {"echo", "get_sum", "get_tiny_image", "get_structured_content"} <= {
        x.function for x in registered.tools
    }
    result = kernel.execute(
        "from mcptools.every.echo import echo\nfrom mcptools.every.get_sum import get_sum\n"
        "from mcptools.every.get_tiny_image import get_tiny_image\n"
        "print(echo(message='hi'), get_sum(a=2, b=3.5), sep=' | ')\nget_tiny_image()"
    )
    assert result.status == "ok", result.error
    assert result.text.startswith("Echo: hi | The sum of 2 and 3.5 is 5.5.\n")
    assert list(result.outputs[0].data) == ["image/png"]  # the tool's image, displayed
    port = _free_port()
    server = subprocess.Popen(
        ["npx", "-y", EVERYTHING, "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if b"listening" in line:
                break
        web = box.register_mcp_server(
            "web", url=f"http://127.0.0.1:{port}/mcp", headers={"X-Token": "t"}, approval="never"
        )
        assert {x.function for x in web.tools} == {x.function for x in registered.tools}
        assert (
            kernel.execute("from mcptools.web.echo import echo\necho(message='over http')").text
            == "'Echo: over http'\n"
        )
    finally:
        server.kill()
        server.wait()
    box.unregister_mcp_server("web")
    box.unregister_mcp_server("every")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_cannot_start_is_mcpserverfailed_with_its_output(box: Sandbox) -> None:
    with pytest.raises(errors.McpServerFailed) as caught:
        box.register_mcp_server(
            "bad", command=sys.executable, args=["-c", "import sys; sys.exit('no such thing here')"]
        )
    assert "no such thing here" in (caught.value.data or {})["log"]
    with pytest.raises(errors.McpServerFailed):
        box.register_mcp_server("gone", url="http://127.0.0.1:9/mcp")


def test_register_params_are_checked(box: Sandbox) -> None:
    for name in ("class", "1x", "a-b", "x" * 65):
        with pytest.raises(errors.InvalidParams, match=r"\$\.name"):
            box.register_mcp_server(name, command="true")
    with pytest.raises(errors.InvalidParams, match="either `command`"):
        box.client.request(
            "cellbox/registerMcpServer", {"sandboxId": box.sandbox_id, "name": "x", "server": {}}
        )
    with pytest.raises(errors.InvalidParams, match="no MCP server 'nope'"):
        box.unregister_mcp_server("nope")


# -- approvals a client does not give --------------------------------------------------------------


def test_a_client_without_approvals_refuses_and_an_unanswered_one_times_out(cellbox_home: Path) -> None:
    code = (
        "import mcptools\nfrom mcptools.time.get_current_time import get_current_time\n"
        "try:\n    get_current_time(timezone='UTC')\n"
        "except mcptools.ToolCallRejected as e:\n    print('rejected')"
    )
    with Daemon(env={"CELLBOX_APPROVAL_TIMEOUT": "2"}) as d:
        sandbox = d.request("cellbox/createSandbox", {})["sandboxId"]
        d.request(
            "cellbox/registerMcpServer",
            {"sandboxId": sandbox, "name": "time", "server": {"command": TIME[0], "args": TIME[1:]}},
        )
        kernel = d.request("cellbox/startKernel", {"sandboxId": sandbox})["kernelId"]
        for answer in ("-32601", "none"):
            msg_id = d.start("cellbox/execute", {"kernelId": kernel, "code": code})
            ask = d.wait_for("cellbox/approveToolCall", lambda p: True)
            (request,) = [n for n in d.notifications if n.get("method") == "cellbox/approveToolCall"]
            d.notifications.remove(request)
            assert ask["kernelId"] == kernel and ask["tool"] == "get_current_time"
            if answer == "-32601":
                d.send({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no"}})
            assert d.response(msg_id, timeout=30)["result"]["text"] == "rejected\n"
            if answer == "none":  # the question is withdrawn
                asked_id = request["id"]
                assert d.wait_for("$/cancelRequest", lambda p, asked=asked_id: p["id"] == asked)


def test_tools_work_in_a_docker_sandbox_without_network(client: Client, docker_engine: None) -> None:
    with client.create_sandbox("docker", network="none") as sandbox:
        sandbox.register_mcp_server("h", command=HOSTILE[0], args=HOSTILE[1:], approval="never")
        kernel = sandbox.start_kernel()
        code = (
            "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
            "except OSError:\n    print('offline')\n"
            "from mcptools.h.echo import echo\nprint(echo(text='from the container'))"
        )
        result = kernel.execute(code, timeout=60)
        assert (result.status, result.text) == ("ok", "offline\n{'echoed': 'from the container'}\n"), (
            result.error
        )


def test_a_flood_of_calls_is_bounded_and_the_end_of_the_execution_ends_them(kernel) -> None:
    started = (
        "import threading, time, mcptools\nfrom mcptools.h.hang import hang\nerrors = []\n"
        "def run():\n    try:\n        hang()\n"
        "    except mcptools.ToolError as e:\n        errors.append(str(e))\n"
        "threads = [threading.Thread(target=run) for _ in range(40)]\n"
        "for t in threads:\n    t.start()\n"
        "deadline = time.time() + 20\n"
        "while len(errors) < 8 and time.time() < deadline:\n    time.sleep(0.05)\n"
        "print(len(errors), set(errors))"
    )
    assert kernel.execute(started).text == "8 {'more than 32 calls of MCP tools at once'}\n"
    ended = "for t in threads:\n    t.join(20)\nprint(len(errors), sum('is over' in e for e in errors))"
    assert kernel.execute(ended).text == "40 32\n"


def test_names_of_the_mcptools_package_itself_and_a_final_newline_are_refused(box: Sandbox) -> None:
    for name in ("call", "ToolError", "_private"):
        with pytest.raises(errors.InvalidParams, match="a name of the mcptools package itself"):
            box.register_mcp_server(name, command="true")
    with pytest.raises(errors.InvalidParams, match="must be a Python identifier"):
        box.client.request(
            "cellbox/registerMcpServer",
            {"sandboxId": box.sandbox_id, "name": "time\n", "server": {"command": "true"}},
        )


def test_a_kernel_that_holds_its_tool_connections_or_never_reads_does_not_wedge_the_agent(kernel) -> None:
    # 200 connections that send nothing, then 4 calls whose 2 MB answers are never read: the
    # agent writes answers as they are taken and stops taking connections at its cap, so the
    # kernel's output, the daemon's calls and later tool calls are all still served
    hold = (
        "import json, os, socket, struct\nheld = []\n"
        "for _ in range(200):\n"
        "    s = socket.socket(socket.AF_UNIX)\n    s.setblocking(False)\n"
        "    try:\n        s.connect(os.environ['CELLBOX_TOOLS'])\n"
        "    except BlockingIOError:\n        pass\n"
        "    held.append(s)\n"
        "arguments = {'text': 'x' * 1000, 'times': 2000}\n"
        "request = json.dumps({'server': 'h', 'tool': 'echo', 'arguments': arguments})\n"
        "for s in held[:4]:\n"
        "    s.setblocking(True)\n    s.sendall(struct.pack('>I', len(request)) + request.encode())\n"
        "print('held')"
    )
    assert kernel.execute(hold, timeout=60).text == "held\n"
    assert kernel.execute("print('served')").text == "served\n"
    release = "for s in held:\n    s.close()\nfrom mcptools.h.echo import echo\nprint(echo(text='after'))"
    assert kernel.execute(release, timeout=60).text == "{'echoed': 'after'}\n"


def test_a_question_the_daemon_withdraws_cancels_the_clients_callback(cellbox_home: Path) -> None:
    cancelled = threading.Event()

    async def never_answers(params: t.ApproveToolCallParams) -> bool:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    code = (
        "import mcptools\nfrom mcptools.time.get_current_time import get_current_time\n"
        "try:\n    get_current_time(timezone='UTC')\n"
        "except mcptools.ToolCallRejected as e:\n    print('rejected')"
    )
    client = Client(approve_tool_call=never_answers, env={"CELLBOX_APPROVAL_TIMEOUT": "1"})
    with client, client.create_sandbox() as sandbox:
        sandbox.register_mcp_server("time", command=TIME[0], args=TIME[1:])
        assert sandbox.start_kernel().execute(code).text == "rejected\n"
        assert cancelled.wait(10)
