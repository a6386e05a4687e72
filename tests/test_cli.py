"""The `cellbox` command, run as `python -m cellboxd` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

CELLBOX = [sys.executable, "-m", "cellboxd"]


def cellbox(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CELLBOX, *args], input=input, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- help ----------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    done = cellbox("--help")
    assert done.returncode == 0
    for command in ("serve", "run", "install", "sources"):
        assert command in done.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("serve", ["--log-level", "--data-dir", "--backend", "examples:"]),
        ("run", ["-c CODE", "FILE", "--timeout", "--env NAME=VALUE", "130", "examples:"]),
        ("install", ["PKG", "--upgrade", "name==version", "examples:"]),
        ("sources", ["MODULE", "--skills DIR", "examples:"]),
    ],
)
def test_help_of_each_command(command: str, expected: list[str]) -> None:
    done = cellbox(command, "--help")
    assert done.returncode == 0
    for text in expected:
        assert text in done.stdout


def test_no_command_prints_usage() -> None:
    done = cellbox()
    assert done.returncode == 2
    assert "usage: cellbox" in done.stderr


def test_bad_arguments_are_usage_errors() -> None:
    assert cellbox("run").returncode == 2
    assert cellbox("run", "-c", "1", "--env", "NOVALUE").returncode == 2
    done = cellbox("sources", "x", "--skills", "/nonexistent/skills")
    assert done.returncode == 2 and "not a directory" in done.stderr


# --- serve ---------------------------------------------------------------------------------


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


def _responses(stdout: bytes) -> dict[int, dict[str, Any]]:
    answers: dict[int, dict[str, Any]] = {}
    while stdout:
        header, _, rest = stdout.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        message = json.loads(rest[:length])
        stdout = rest[length:]
        if "id" in message and "method" not in message:
            answers[message["id"]] = message
    return answers


def test_serve_speaks_the_lsp_lifecycle_on_stdio() -> None:
    messages: list[dict[str, Any]] = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"processId": None, "capabilities": {}},
        },
        {"jsonrpc": "2.0", "method": "initialized", "params": {}},
        {"jsonrpc": "2.0", "id": 2, "method": "cellbox/listSandboxes", "params": {}},
        {"jsonrpc": "2.0", "id": 3, "method": "shutdown"},
        {"jsonrpc": "2.0", "method": "exit"},
    ]
    done = subprocess.run(
        [*CELLBOX, "serve", "--log-level", "warning"],
        input=b"".join(_frame(m) for m in messages),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    answers = _responses(done.stdout)
    assert answers[1]["result"]["serverInfo"]["name"] == "cellbox"
    assert answers[1]["result"]["capabilities"]["experimental"]["cellbox"]["protocolVersion"] == 1
    assert answers[2]["result"] == {"sandboxes": []}
    assert answers[3]["result"] is None


# --- run -----------------------------------------------------------------------------------


def test_run_code_streams_stdout_and_stderr() -> None:
    done = cellbox(
        "run", "-c", "import sys\nfor i in range(3):\n    print(i)\nprint('oops', file=sys.stderr)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n1\n2\n"
    assert "oops\n" in done.stderr


def test_run_shows_displays_on_stderr() -> None:
    done = cellbox(
        "run", "-c", "from IPython.display import display\ndisplay({'text/plain': 'a value'}, raw=True)"
    )
    assert done.returncode == 0, done.stderr
    assert "[display text/plain: a value]" in done.stderr


def test_run_an_exception_exits_1_with_its_traceback() -> None:
    done = cellbox("run", "-c", "print('before')\ndef f():\n    raise KeyError('missing')\nf()")
    assert done.returncode == 1
    assert done.stdout == "before\n"
    assert "KeyError" in done.stderr and "missing" in done.stderr
    assert "\x1b[" not in done.stderr


def test_run_a_file(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("total = sum(range(10))\nprint(f'total={total}')\n")
    done = cellbox("run", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "total=45\n"


def test_run_stdin_with_env() -> None:
    done = cellbox(
        "run", "-", "--env", "GREETING=hi there", input="import os\nprint(os.environ['GREETING'])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi there\n"


def test_run_a_missing_file_exits_1() -> None:
    done = cellbox("run", "/nonexistent/script.py")
    assert done.returncode == 1
    assert done.stderr.startswith("cellbox: cannot read /nonexistent/script.py")


def test_run_timeout_exits_1() -> None:
    done = cellbox("run", "-c", "import time\nprint('start', flush=True)\ntime.sleep(30)", "--timeout", "1")
    assert done.returncode == 1
    assert done.stdout == "start\n"
    assert "timed out after 1 s" in done.stderr


def test_ctrl_c_cancels_and_exits_130() -> None:
    with subprocess.Popen(
        [*CELLBOX, "run", "-c", "import time\nprint('start', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "start\n"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert time.monotonic() - started < 15
    assert "cancelled" in stderr
    assert "Traceback" not in stderr


# --- install and sources -------------------------------------------------------------------


def test_install_prints_name_and_version() -> None:
    done = cellbox("install", "cowsay==6.1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cowsay==6.1"]


def test_a_failed_install_exits_1_with_the_log() -> None:
    done = cellbox("install", "cellbox-surely-no-such-package-4d1c==0.0.1")
    assert done.returncode == 1
    assert done.stderr.count("cellbox: ") >= 1
    assert "cellbox-surely-no-such-package-4d1c" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_closed_stderr_ends_the_command_instead_of_hanging_it() -> None:
    """The progress lines meet a broken pipe in the client's thread (rich then raises
    SystemExit): the command still ends, with 1."""
    proc = subprocess.Popen(
        [*CELLBOX, "install", "cellbox-surely-no-such-package-4d1c==0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        proc.stderr.close()
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()  # a hung one: its daemon goes with it, its stdin closed
        proc.wait()


def test_sources_with_skills(tmp_path: Path) -> None:
    skills = tmp_path / "my-skills"
    (skills / "helpers").mkdir(parents=True)
    (skills / "helpers" / "__init__.py").write_text("")
    (skills / "helpers" / "text.py").write_text("def shout(s: str) -> str:\n    return s.upper()\n")
    (skills / "greet.py").write_text("from helpers.text import shout\n")
    done = cellbox("sources", "greet", "helpers.text", "--skills", str(skills))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "```python\n# Module: greet\n\nfrom helpers.text import shout\n\n```\n\n"
        "```python\n# Module: helpers.text\n\ndef shout(s: str) -> str:\n    return s.upper()\n\n```\n"
    )


def test_sources_of_a_missing_module_is_a_clean_error() -> None:
    done = cellbox("sources", "surely_no_such_module_4d1c")
    assert done.returncode == 1
    assert "cellbox: " in done.stderr and "surely_no_such_module_4d1c" in done.stderr
    assert "Traceback" not in done.stderr


# --- run with MCP servers' tools ----------------------------------------------------------------

HOSTILE = [sys.executable, str(Path(__file__).parent / "mcp_servers" / "hostile.py")]
_ECHO = "from mcptools.h.echo import echo\nprint(echo(text='hi'))"


def _mcp_config(tmp_path: Path, approval: str) -> str:
    path = tmp_path / "servers.json"
    server = {"command": HOSTILE[0], "args": HOSTILE[1:], "approval": approval}
    path.write_text(json.dumps({"mcpServers": {"h": server}}))
    return str(path)


def test_run_registers_the_mcp_config_and_approve_approves(tmp_path: Path) -> None:
    done = cellbox("run", "-c", _ECHO, "--mcp-config", _mcp_config(tmp_path, "ask"), "--approve")
    assert (done.returncode, done.stdout) == (0, "{'echoed': 'hi'}\n"), done.stderr


def test_run_without_a_terminal_refuses_the_calls_it_cannot_ask(tmp_path: Path) -> None:
    code = (
        "import mcptools\ntry:\n    "
        + _ECHO.replace("\n", "\n    ")
        + "\nexcept mcptools.ToolCallRejected:\n    print('no')"
    )
    done = subprocess.run(
        [*CELLBOX, "run", "-c", code, "--mcp-config", _mcp_config(tmp_path, "ask")],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # no controlling terminal
    )
    assert done.stdout == "no\n", done.stderr
    assert "refused a call of h.echo: no terminal to ask (--approve)" in done.stderr


@pytest.mark.parametrize(("answer", "printed"), [("y", "{'echoed': 'hi'}"), ("n", "ToolCallRejected")])
def test_run_asks_on_the_terminal(tmp_path: Path, answer: str, printed: str) -> None:
    import pty

    main, side = pty.openpty()

    def take_terminal() -> None:  # the pty becomes the controlling terminal, as in a shell
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*CELLBOX, "run", "-c", _ECHO, "--mcp-config", _mcp_config(tmp_path, "ask")],
        stdin=side,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=take_terminal,
    )
    os.close(side)
    seen = b""
    while b"[y/N] " not in seen:
        seen += os.read(main, 4096)
    assert (
        b'cellbox: a cell calls the tool "echo" of "h" with\n  "text": "hi"\n  "times": 1\nallow it? [y/N] '
        in seen.replace(b"\r\n", b"\n")
    )
    os.write(main, answer.encode() + b"\n")
    out, err = proc.communicate(timeout=120)
    os.close(main)
    assert printed in out + err


def test_run_takes_mcp_servers_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[mcp_servers.h]\ncommand = {json.dumps(HOSTILE[0])}\nargs = {json.dumps(HOSTILE[1:])}\n"
        'approval = "never"\n'
    )
    done = subprocess.run(
        [*CELLBOX, "run", "-c", _ECHO],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CELLBOX_CONFIG": str(config)},
    )
    assert (done.returncode, done.stdout) == (0, "{'echoed': 'hi'}\n"), done.stderr


def test_run_refuses_a_bad_mcp_config(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"mcpServers": {"not-a-name": {"command": "x"}}}))
    done = cellbox("run", "-c", "1", "--mcp-config", str(path))
    assert done.returncode == 2 and "mcpServers.not-a-name" in done.stderr
