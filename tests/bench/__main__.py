"""`python -m tests.bench`: runs every case, prints the table and writes the JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
from rich.console import Console

from cellbox import __version__
from tests.bench import cases
from tests.bench.drivers import daemon, remove_stale_containers
from tests.bench.report import Row, machine, print_table, write_json

BACKENDS = ("local", "docker", "docker-exec", "remote")
# the docker targets: the daemon's environment for each, on top of its engine's DOCKER_HOST
_TARGETS = {"docker": {}, "docker-exec": {"CELLBOX_DOCKER_CHANNEL": "exec"}, "remote": {}}


def _engine(host: str | None = None) -> docker.DockerClient | None:
    """A client of the Docker engine at `host` (default: the environment's), or None when none
    answers."""
    try:
        engine = docker.DockerClient(base_url=host, timeout=30) if host else docker.from_env(timeout=30)
        engine.ping()
    except Exception:
        return None
    return engine


async def _image(engine: docker.DockerClient, home: Path, env: dict[str, str]) -> str:
    """The tag of cellbox's minimal image, built through the daemon when it is missing."""
    tag = f"cellbox-minimal:{__version__}"
    try:
        await asyncio.to_thread(engine.images.get, tag)
    except docker.errors.ImageNotFound:
        async with daemon(home, extra=env) as client:
            tag = (await client.build_image(variant="minimal")).tag
    return tag


async def _case(
    log: Console,
    name: str,
    backend: str | None,
    measure: Callable[[], Awaitable[list[Row]]],
    budget: float = cases.BUDGET,
) -> list[Row]:
    started = time.perf_counter()
    rows = await cases.guarded(name, backend, measure, budget)
    log.log(f"{name if backend is None else f'{name} ({backend})'}: {time.perf_counter() - started:.1f} s")
    return rows


async def _session(bench: cases.Bench, backend: str, log: Console) -> list[Row]:
    """The cases that share one daemon, one sandbox of kernels and the baseline's kernels."""
    rows: list[Row] = []
    async with cases.session(bench, backend) as s:
        for name, measure in (
            ("round trip", cases.round_trip),
            ("parallel", cases.parallel),
            ("streaming", cases.streaming),
            ("short lines", cases.short_lines),
            ("big line", cases.big_line),  # last: it may take the daemon down
        ):
            rows += await _case(log, name, backend, functools.partial(measure, s, bench.plan))
    return rows


async def run(
    plan: cases.Plan,
    backends: list[str],
    engines: dict[str, tuple[docker.DockerClient, str | None]],
    log: Console,
) -> list[Row]:
    """Every case on every backend; the temporary folder and what ran in it are gone at the end.
    `engines` holds the docker targets' clients and DOCKER_HOSTs."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # cleans up as Ctrl-C does
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cbx-bench-") as tmp:
        measured: dict[str, cases.Engine] = {}
        for name, (client, host) in engines.items():
            if name in backends:
                env = {**({"DOCKER_HOST": host} if host else {}), **_TARGETS[name]}
                await asyncio.to_thread(remove_stale_containers, client)
                image = await _image(client, Path(tmp), env)
                remote_host = urllib.parse.urlparse(host).hostname if name == "remote" and host else None
                measured[name] = cases.Engine(client, image, env, remote_host)
        bench = cases.Bench(plan, Path(tmp), measured)
        rows += await _case(log, "daemon start", None, functools.partial(cases.daemon_start, bench))
        for backend in backends:
            rows += await _case(
                log, "first result", backend, functools.partial(cases.first_result, bench, backend)
            )
            rows += await _case(
                log,
                "first result, warm pool",
                backend,
                functools.partial(cases.first_result_pooled, bench, backend),
            )
        for backend in backends:
            rows += await _case(log, "session", backend, functools.partial(_session, bench, backend, log))
            count = plan.churn if backend == "local" else plan.docker_churn
            churn = functools.partial(cases.churn, bench, backend, count)
            rows += await _case(log, "churn", backend, churn, max(cases.BUDGET, 10.0 * count))
            fairness = functools.partial(cases.fairness, bench, backend, plan)
            rows += await _case(log, "fairness", backend, fairness)
            count = plan.scale if backend == "local" else plan.docker_scale
            scale = functools.partial(cases.scale, bench, backend, count)
            rows += await _case(log, "scale", backend, scale, max(cases.BUDGET, 10.0 * count))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="cellbox against jupyter_client on the same kernels (see tests/bench/README.md)",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of a few minutes")
    parser.add_argument(
        "--json", type=Path, default=Path("bench-results.json"), help="where to write the results"
    )
    parser.add_argument(
        "--backends",
        help="comma-separated, of local, docker, docker-exec (the docker backend on exec sessions only) "
        "and remote (default: those whose engine answers)",
    )
    parser.add_argument(
        "--remote",
        metavar="DOCKER_HOST",
        help="an engine of another machine (tcp://HOST:PORT) to measure the docker backend on too",
    )
    args = parser.parse_args(argv)
    engines: dict[str, tuple[docker.DockerClient, str | None]] = {}
    if (engine := _engine()) is not None:
        engines["docker"] = engines["docker-exec"] = (engine, None)
    if args.remote and (remote := _engine(args.remote)) is not None:
        engines["remote"] = (remote, args.remote)
    if args.backends is None:
        backends = ["local", *engines]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not backends or set(backends) - set(BACKENDS):
            parser.error(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}")
        for name in set(backends) - {"local"} - set(engines):
            where = "--remote" if name == "remote" else "DOCKER_HOST"
            parser.error(f"--backends {name}: no Docker engine answers (see {where})")
    plan = cases.QUICK if args.quick else cases.FULL
    log = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    try:
        rows = asyncio.run(run(plan, backends, engines, log))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.print("[red]interrupted: cleaned up, no results")
        return 130
    duration = time.perf_counter() - started
    info = machine(engine.version()["Version"] if engine is not None else None)
    if "remote" in engines:
        info["remote_engine"] = f"{engines['remote'][0].version()['Version']} at {args.remote}"
    title = f"cellbox {__version__} vs jupyter_client · {info['cores']} cores · {duration:.0f} s"
    print_table(out, rows, title + (" · quick" if args.quick else ""))
    meta: dict[str, Any] = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "backends": backends,
        "plan": dataclasses.asdict(plan),
        "duration_s": round(duration, 1),
    }
    write_json(args.json, rows, meta)
    out.print(f"results written to {args.json}")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
