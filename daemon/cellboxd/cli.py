"""The `cellbox` command: the daemon (`serve`) and one-shot commands that drive it as a client."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from cellbox import __version__
from cellbox import types as t
from cellbox.client import Client, ExecutionEvent
from cellbox.errors import (
    BackendUnavailable,
    BuildFailed,
    CellboxError,
    InstallFailed,
    InvalidDependencies,
    McpServerFailed,
)

if TYPE_CHECKING:
    from cellboxd.backends.base import Backend
    from cellboxd.config import Resolved

_BACKENDS = list(get_args(t.Backend))
_LOG_LEVELS = ["debug", "info", "warning", "error"]
_VARIANTS = ["minimal", "basic", "example"]
_SHORT_ID = 12
_EXIT_INTERRUPTED = 130
_DISPLAY_TEXT_CHARS = 80
_APPROVAL_CHARS = 2000  # characters of a tool call's arguments shown when asking


def _client(approve: Callable[[t.ApproveToolCallParams], bool] | None = None) -> Client:
    """A client of a daemon run by this interpreter, which logs warnings and errors only."""
    return Client(
        [sys.executable, "-m", "cellboxd", "serve", "--log-level", "warning"], approve_tool_call=approve
    )


def _approver(approve_all: bool) -> Callable[[t.ApproveToolCallParams], bool]:
    """Answers the daemon's approveToolCall: yes with --approve, else the user's word on the
    terminal (also when stdin is the code); without a terminal, no. What the sandbox passed
    is shown as JSON, whose escapes keep terminal control sequences out."""
    asking = threading.Lock()  # one question at a time: calls from threads of a cell queue

    def approve(call: t.ApproveToolCallParams) -> bool:
        if approve_all:
            return True
        from cellboxd.mcptools import preview

        question = (
            f"cellbox: a cell calls the tool {json.dumps(call.tool)} of {json.dumps(call.server)} with\n"
            f"{preview(call.arguments, _APPROVAL_CHARS)}\nallow it? [y/N] "
        )
        with asking:
            try:
                with open("/dev/tty", "rb+", buffering=0) as tty:  # unbuffered: a tty cannot seek
                    tty.write(question.encode())
                    return tty.readline().decode(errors="replace").strip().lower() in ("y", "yes")
            except OSError:
                print(
                    f"cellbox: refused a call of {call.server}.{call.tool}: no terminal to ask (--approve)",
                    file=sys.stderr,
                )
                return False

    return approve


# --- serve ---------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from cellboxd import codecache
    from cellboxd.config import ConfigError, cache_path, load_settings

    try:
        settings = load_settings(
            log_level=args.log_level, data_dir=args.data_dir, default_backend=args.backend
        )
    except ConfigError as exc:
        print(f"cellbox: {exc}", file=sys.stderr)
        return 2
    # lazily: the other subcommands start faster without the server
    with codecache.cached_compile(cache_path(settings)):
        from cellboxd.server import serve
    return serve(settings)


# --- run -----------------------------------------------------------------------------------


def _env_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _show(event: ExecutionEvent) -> None:
    if isinstance(event, t.OutputNotification):
        stream = sys.stdout if event.stream == "stdout" else sys.stderr
        stream.write(event.text)
        stream.flush()
    else:
        print(_display_line(event), file=sys.stderr, flush=True)


def _display_line(event: t.DisplayNotification) -> str:
    if (where := event.path or event.file) is not None:
        mimetype = next((m for m in event.data if m != "text/plain"), "text/plain")
        return f"[display {mimetype} → {where}]"
    text = event.data.get("text/plain")
    if isinstance(text, str):
        line = " ".join(text.split())
        if len(line) > _DISPLAY_TEXT_CHARS:
            line = line[: _DISPLAY_TEXT_CHARS - 1] + "…"
        return f"[display text/plain: {line}]"
    return f"[display {', '.join(event.data)}]"


def _report(result: t.ExecuteResult, timeout: float) -> int:
    """Print what the output stream did not say about the result; the exit status."""
    if result.status == "ok":
        return 0
    if result.status == "error" and result.error is not None:
        lines = result.error.traceback or [f"{result.error.ename}: {result.error.evalue}"]
        print("\n".join(lines), file=sys.stderr)
        return 1
    message = {
        "timeout": f"the execution timed out after {timeout:g} s",
        "died": "the kernel died during the execution",
        "cancelled": "the execution was cancelled",
    }.get(result.status, f"the execution ended with status {result.status!r}")
    if result.error is not None and result.error.evalue:
        message += f" ({result.error.evalue})"
    print(f"cellbox: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    if args.code is not None:
        code: str = args.code
    elif args.file == "-":
        code = sys.stdin.read()
    else:
        try:
            code = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            print(f"cellbox: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 1
    from cellboxd import mcpconfig

    try:
        servers = mcpconfig.configured(args.mcp_config)
    except mcpconfig.McpConfigError as e:
        print(f"cellbox: {e}", file=sys.stderr)
        return 2
    client = _client(_approver(args.approve))
    with client, client.create_sandbox(args.backend, env=dict(args.env)) as sandbox:
        for name, server in servers.items():
            try:
                sandbox.register_mcp_server(name, **server.registration())
            except McpServerFailed as e:
                log = (e.data or {}).get("log") or ""
                print(f"cellbox: {e.message}" + (f"; its output:\n{log}" if log else ""), file=sys.stderr)
                return 1
        kernel = sandbox.start_kernel()
        execution = kernel.stream(code, timeout=args.timeout)
        try:
            for event in execution:
                _show(event)
            result = execution.result()
        except KeyboardInterrupt:
            result = execution.cancel()
            for event in execution:  # what arrived before the cancellation took effect
                _show(event)
            _report(result, args.timeout)
            return _EXIT_INTERRUPTED
    return _report(result, args.timeout)


# --- install -------------------------------------------------------------------------------


def _install(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    shown: list[str] = []

    def progress(message: str) -> None:
        shown.append(message)
        console.print(message.rstrip("\n"), style="dim", markup=False, soft_wrap=True)

    with _client() as client, client.create_sandbox("local") as sandbox:
        try:
            installed = sandbox.install(args.packages, upgrade=args.upgrade, on_progress=progress)
        except InstallFailed as e:
            print(f"cellbox: {e.message}", file=sys.stderr)
            log = (e.data or {}).get("log")
            if log and not shown:  # else the progress lines showed it already
                print(log.rstrip("\n"), file=sys.stderr)
            return 1
    for package in installed:
        print(f"{package.name}=={package.version}")
    return 0


# --- sources -------------------------------------------------------------------------------


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path


def _sources(args: argparse.Namespace) -> int:
    with _client() as client, client.create_sandbox("local") as sandbox:
        if args.skills is not None:
            sandbox.upload(args.skills, "skills")
        result = sandbox.skill_sources(args.modules)
    print(result.formatted)
    return 0


# --- build and images ----------------------------------------------------------------------


def _build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    dependencies: str | None = None
    if args.dependencies is not None:
        try:
            dependencies = Path(args.dependencies).read_text(encoding="utf-8")
        except OSError as e:
            print(f"cellbox: cannot read {args.dependencies}: {e.strerror}", file=sys.stderr)
            return 1
    console = Console(stderr=True, highlight=False)
    source = f"from {args.dependencies}" if args.dependencies else f"variant {args.variant or 'minimal'}"
    printed = False  # whether the build's lines were printed (no terminal: no spinner)
    with _client() as client, console.status(f"building an image of {source}") as status:

        def progress(message: str) -> None:
            nonlocal printed
            line = message.rstrip("\n")
            if console.is_terminal:
                status.update(Text(f"building: {line}", no_wrap=True, overflow="ellipsis"))
            else:
                printed = True
                console.print(line, style="dim", markup=False, soft_wrap=True)

        try:
            result = client.build_image(
                variant=args.variant,
                dependencies=dependencies,
                tag=args.tag,
                base_image=args.base_image,
                root=args.root,
                on_progress=progress,
            )
        except InvalidDependencies as e:
            print(f"cellbox: {args.dependencies}: {e.message}", file=sys.stderr)
            return 1
        except BuildFailed as e:
            status.stop()
            log = (e.data or {}).get("log")
            if log and not printed:
                console.print(log.rstrip("\n"), markup=False, soft_wrap=True)
            print(f"cellbox: {e.message}", file=sys.stderr)
            return 1
    print(f"{result.tag} {result.image_id} {'built' if result.built else 'up to date'}")
    return 0


def _images(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client() as client:
        images = client.list_images()
    if not images:
        print("cellbox: no cellbox images; build one with `cellbox build`", file=sys.stderr)
        return 0
    table = Table("TAG", "IMAGE ID", "VARIANT", "CREATED", box=None, pad_edge=False, header_style="bold")
    for image in images:
        short_id = image.image_id.removeprefix("sha256:")[:_SHORT_ID]
        table.add_row(image.tag, short_id, image.variant or "-", _local_time(image.created_at))
    # a pipe gets whole lines, not a table cut to 80 columns
    Console(highlight=False, width=None if sys.stdout.isatty() else 1000).print(table)
    return 0


def _local_time(iso: str) -> str:
    try:
        return datetime.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


# --- ps, prune -----------------------------------------------------------------------------


def _backends() -> tuple[Resolved, dict[t.Backend, Backend]]:
    from cellboxd import backends
    from cellboxd.config import load_settings, resolve

    resolved = resolve(load_settings())
    return resolved, backends.make(resolved, daemon_id="cli")


def _ps(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    _, backends = _backends()
    entries = []
    for backend in backends.values():
        try:
            entries += backend.entries()
        except BackendUnavailable as exc:
            print(f"cellbox: {backend.name} sandboxes not shown: {exc.message}", file=sys.stderr)
    if not args.all:
        entries = [e for e in entries if not e.orphaned]
    table = Table("SANDBOX", "BACKEND", "DAEMON", "STATE", "IMAGE", "CREATED", box=None, header_style="bold")
    for e in entries:
        state = "orphaned" if e.orphaned else "running"
        table.add_row(e.sandbox_id, e.backend, str(e.daemon_pid or "-"), state, e.image or "-", e.created_at)
    Console(highlight=False, width=None if sys.stdout.isatty() else 1000).print(table)
    return 0


def _prune(args: argparse.Namespace) -> int:
    import asyncio

    from cellboxd import inventory

    resolved, backends = _backends()
    places: dict[str, str] = {backend.name: backend.place for backend in backends.values()}
    removed = list(inventory.remove_orphan_folders(resolved.sandboxes_path, resolved.runtime_path, places))
    for backend in backends.values():
        removed += asyncio.run(backend.remove_orphans())
    for sandbox_id in dict.fromkeys(removed):
        print(f"removed {sandbox_id}")
    return 0


# --- mcp -----------------------------------------------------------------------------------


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _mcp(args: argparse.Namespace) -> int:
    from cellboxd import mcpserver  # lazily: the MCP SDK takes a while to import

    return mcpserver.main(args)


# --- the parser ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    def command(name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    parser = argparse.ArgumentParser(
        prog="cellbox",
        description="Sandboxed, stateful Python kernels behind one JSON-RPC daemon.",
        epilog="Run `cellbox COMMAND --help` for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"cellbox {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = command(
        "serve",
        "run the daemon on stdin/stdout (for editors and clients)",
        "Run the cellbox daemon: JSON-RPC 2.0 with LSP framing on stdin and stdout, logs on\n"
        "stderr. Editors and the Python client start it; it exits when its client says `exit`.",
        "examples:\n  cellbox serve\n  cellbox serve --log-level debug --backend docker",
    )
    serve.add_argument("--log-level", choices=_LOG_LEVELS, help="the lowest level logged (default: info)")
    serve.add_argument("--data-dir", metavar="DIR", help="where sandboxes and state are kept")
    serve.add_argument("--backend", choices=_BACKENDS, help="the default backend of new sandboxes")
    serve.set_defaults(handler=_serve)

    run = command(
        "run",
        "run Python code once in a fresh sandbox",
        "Run code in a fresh sandbox and kernel, then throw both away. The kernel's stdout and\n"
        "stderr are streamed as they are produced; displays (plots, images) are shown as one\n"
        "line on stderr with the file they were saved to. Exits 1 when the code raises, times\n"
        "out or its kernel dies, and 130 when interrupted with Ctrl-C.",
        "examples:\n"
        "  cellbox run -c 'print(6 * 7)'\n"
        "  cellbox run script.py --timeout 600\n"
        "  echo 'import sys; print(sys.version)' | cellbox run -\n"
        "  cellbox run -c 'import os; print(os.environ[\"API_KEY\"])' --env API_KEY=secret\n"
        "  cellbox run agent.py --mcp-config servers.json   # its code calls mcptools.NAME",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--code", help="the code to run")
    source.add_argument("file", nargs="?", metavar="FILE", help="a file of code to run; - reads stdin")
    run.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds before the kernel is interrupted (120)",
    )
    run.add_argument("--backend", choices=_BACKENDS, help="the sandbox backend (default: the daemon's)")
    run.add_argument(
        "--env",
        type=_env_var,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the sandbox (repeatable)",
    )
    run.add_argument(
        "--mcp-config",
        metavar="FILE",
        help='MCP servers (`{"mcpServers": {...}}`) whose tools the code calls as mcptools.NAME; '
        "with the config file's mcp_servers",
    )
    run.add_argument(
        "--approve",
        action="store_true",
        help="approve every call of their tools (else each is asked on the terminal)",
    )
    run.set_defaults(handler=_run)

    install = command(
        "install",
        "install packages into a fresh local sandbox and print their versions",
        "Install packages (PEP 508 requirements) into a fresh local sandbox, showing the\n"
        "installer's progress on stderr, and print `name==version` for each installed package.",
        "examples:\n  cellbox install requests\n  cellbox install 'httpx>=0.27' rich --upgrade",
    )
    install.add_argument("packages", nargs="+", metavar="PKG", help="a requirement, e.g. requests==2.32.3")
    install.add_argument("--upgrade", action="store_true", help="upgrade packages that are already installed")
    install.set_defaults(handler=_install)

    sources = command(
        "sources",
        "print the sources of modules as a sandbox resolves them",
        "Print the sources of modules, resolved inside a fresh local sandbox without running\n"
        "them, formatted for a prompt. --skills DIR copies DIR into the sandbox's `skills/`\n"
        "folder first, so that the modules in it resolve.",
        "examples:\n  cellbox sources json.decoder\n  cellbox sources weather weather.api --skills ./skills",
    )
    sources.add_argument("modules", nargs="+", metavar="MODULE", help="a dotted module name")
    sources.add_argument("--skills", type=_directory, metavar="DIR", help="a folder of skill modules")
    sources.set_defaults(handler=_sources)

    build = command(
        "build",
        "build a docker image for sandboxes from a variant or a dependency file",
        "Build a Docker image for sandboxes of the docker backend: the base image, a virtual\n"
        "environment with ipykernel and the dependencies, and a non-root user `cellbox` with your\n"
        "UID. The dependency file has the lines of Poetry's [tool.poetry.dependencies] table\n"
        '(`pandas = "^2.2"`, `python = "^3.11"`). An image with the same inputs under the tag is\n'
        "kept, not rebuilt. A base image the engine does not have is pulled, with progress.\n"
        "Prints `TAG IMAGE_ID built` (or `up to date`); on failure the build's log goes to stderr.",
        "examples:\n"
        "  cellbox build\n"
        "  cellbox build --variant basic\n"
        "  cellbox build --dependencies deps.txt --tag my-agent:1\n"
        "  cellbox build --variant example --base-image python:3.12-slim --root",
    )
    deps_source = build.add_mutually_exclusive_group()
    deps_source.add_argument(
        "--variant", choices=_VARIANTS, help="a built-in set of dependencies (default: minimal)"
    )
    deps_source.add_argument("--dependencies", metavar="FILE", help="a dependency file")
    build.add_argument(
        "--tag",
        metavar="TAG",
        help="the image's name[:tag] (default: cellbox-VARIANT:VERSION or cellbox-custom:HASH)",
    )
    build.add_argument(
        "--base-image",
        metavar="IMAGE",
        help="the image to build on (default: $CELLBOX_BASE_IMAGE, else python:3.11-slim)",
    )
    build.add_argument("--root", action="store_true", help="keep root as the image's user")
    build.set_defaults(handler=_build)

    images = command(
        "images",
        "list the docker images cellbox built",
        "List the Docker images cellbox built (those with the label cellbox.image): tag, image\n"
        "id, variant (- for a dependency file) and when it was built, newest first.",
        "examples:\n  cellbox images\n  cellbox images | grep basic",
    )
    images.set_defaults(handler=_images)

    ps = command(
        "ps",
        "list the sandboxes on this machine, of every daemon",
        "List the sandboxes of every cellbox daemon of yours on this machine: local sandbox\n"
        "folders and docker containers, with the PID of the daemon that owns each. --all adds\n"
        "orphans, left by daemons that were killed (`cellbox prune` removes them).",
        "examples:\n  cellbox ps\n  cellbox ps --all",
    )
    ps.add_argument("--all", action="store_true", help="also list orphaned sandboxes")
    ps.set_defaults(handler=_ps)

    prune = command(
        "prune",
        "remove sandboxes left behind by daemons that are gone",
        "Remove the sandbox folders and docker containers whose daemon is no longer running\n"
        "(a daemon that exits removes its own; one that is killed cannot). Sandboxes of running\n"
        "daemons are left alone. Prints the id of each sandbox removed.",
        "examples:\n  cellbox prune",
    )
    prune.set_defaults(handler=_prune)

    mcp = command(
        "mcp",
        "serve sandboxed kernels to an agent as an MCP server",
        "Run an MCP server whose tools run Python in a stateful kernel (execute_python), install\n"
        "packages, show module sources and read, write and list files. Each MCP session gets a\n"
        "sandbox of its own, made at its first tool call and removed when the session ends.\n"
        "It speaks MCP on stdin and stdout, or streamable HTTP at http://HOST:PORT/mcp with\n"
        "--http, where every request needs `Authorization: Bearer TOKEN` (the token of\n"
        "--token-file, else one made up and printed on stderr). --mcp-config FILE names MCP\n"
        'servers (`{"mcpServers": {...}}`) the kernel\'s code can call as mcptools.NAME; each\n'
        "call is approved by the host's user (MCP elicitation) or by --approve, else refused.",
        "examples:\n"
        "  cellbox mcp\n"
        "  cellbox mcp --backend docker --image basic --network none --memory-mb 1024\n"
        "  cellbox mcp --http 8000 --token-file ~/.config/cellbox/mcp-token\n"
        "  cellbox mcp --mcp-config servers.json --env API_KEY=secret",
    )
    mcp.add_argument("--http", metavar="[HOST:]PORT", help="serve streamable HTTP (HOST: 127.0.0.1)")
    mcp.add_argument("--token-file", metavar="FILE", help="the bearer token HTTP clients must send")
    mcp.add_argument("--backend", choices=_BACKENDS, help="the sandboxes' backend (default: the daemon's)")
    mcp.add_argument("--image", metavar="IMAGE", help="a docker image or variant for the sandboxes")
    mcp.add_argument(
        "--env",
        type=_env_var,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the sandboxes (repeatable)",
    )
    mcp.add_argument("--memory-mb", type=_positive(int), metavar="MB", help="docker: memory limit")
    mcp.add_argument("--cpus", type=_positive(float), metavar="N", help="docker: CPU limit")
    mcp.add_argument("--pids", type=_positive(int), metavar="N", help="docker: process limit")
    mcp.add_argument("--network", choices=get_args(t.Network), help="docker: `none` cuts the sandboxes off")
    mcp.add_argument(
        "--max-output-chars",
        type=_positive(int),
        default=20_000,
        metavar="N",
        help="characters of output a tool answers at most (20000)",
    )
    mcp.add_argument("--mcp-config", metavar="FILE", help="MCP servers for the kernel's code (JSON)")
    mcp.add_argument("--approve", action="store_true", help="approve every tool call of those servers")
    mcp.set_defaults(handler=_mcp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.handler(args)
    except CellboxError as e:
        print(f"cellbox: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    return status
