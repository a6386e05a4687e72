"""The cases: what each one runs on both sides, and the rows it reports."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from jupyter_client.asynchronous.client import AsyncKernelClient

from cellbox import AsyncClient, AsyncExecution, CellboxError, PoolSpec
from cellbox import types as t
from cellboxd.backends.docker.sandbox import LABEL_DAEMON_PID
from tests.bench import procfs
from tests.bench.drivers import (
    BaselineDriver,
    CellboxDriver,
    CellboxFailed,
    Driver,
    cellbox_call,
    daemon,
    docker_kernels,
    gather_all,
    local_kernels,
)
from tests.bench.report import Row, Target

MB = 1 << 20
KERNELS = 8  # kernels busy at once in the parallel case
WARMUP = 20  # executes on each side before the round trips are timed
BLOCK = 25  # round trips per side in turn, so that a load on the machine hits both sides alike
WARM_WINDOW = 0.3  # seconds the parallel loops run before counting starts
SETTLE = 0.5  # seconds a daemon gets to go quiet before its memory, fds and children are read
CHURN_CONCURRENCY = 4  # sandboxes alive at once in the churn case
FLOODERS = 8  # sandboxes flooding in the fairness case
# prints 1 KiB lines and displays 3 MB, without end
FLOOD = (
    "from IPython.display import display\nline = 'f' * 1023\nwhile True:\n"
    "    for _ in range(2000):\n        print(line)\n"
    "    display({'text/plain': 'd' * 3_000_000}, raw=True)"
)
BUDGET = 300.0  # seconds a case may take before it is abandoned (churn: 10 s a sandbox)


@dataclass(frozen=True)
class Plan:
    """The counts of a run: `FULL`, or `QUICK` for a smoke run of a few minutes."""

    round_trips: int
    window: float  # seconds of one counting window of the parallel case
    windows: int  # windows per side, taken in turn
    stream_mb: int
    stream_runs: int
    short_lines: int
    big_line_mb: int
    starts: int  # daemons spawned for the daemon start case
    first_results: int  # per backend
    churn: int  # local sandboxes
    docker_churn: int  # docker sandboxes: each one adds about 0.4 s to the run
    fair_rounds: int  # executes timed on the quiet sandbox while the others flood
    scale: int  # local sandboxes alive at once, each with a kernel
    docker_scale: int  # docker ones


FULL = Plan(500, 2.0, 3, 100, 3, 200_000, 50, 5, 3, 64, 64, 200, 100, 50)
QUICK = Plan(100, 1.0, 1, 10, 1, 50_000, 10, 2, 1, 16, 8, 30, 10, 5)


@dataclass
class Engine:
    """A Docker engine the docker backend is measured on, against its own baseline."""

    client: docker.DockerClient
    image: str  # cellbox's minimal image, for docker sandboxes and the docker baseline
    env: dict[str, str]  # for the daemon: its DOCKER_HOST (none: the environment's), settings
    remote_host: str | None = None  # where an engine of another machine publishes ports


@dataclass
class Bench:
    """What every case needs; `engines` are the docker targets by name ("docker", "docker-exec",
    "remote")."""

    plan: Plan
    home: Path  # the daemons' data, logs and runtime dirs, and the baseline's files
    engines: dict[str, Engine]

    def daemon(
        self, target: str, pool: list[PoolSpec] | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncClient]:
        engine = self.engines.get(target)
        return daemon(self.home, pool, engine.env if engine is not None else None)


def backend_of(target: str) -> t.Backend:
    """The backend a target's sandboxes are made with."""
    return "local" if target == "local" else "docker"


@dataclass
class Session:
    """One daemon with one sandbox of KERNELS kernels, and as many baseline kernels."""

    backend: str
    pid: int  # the daemon's
    cellbox: list[CellboxDriver]
    baseline: list[BaselineDriver]


def baseline_kernels(
    bench: Bench, target: str, n: int
) -> contextlib.AbstractAsyncContextManager[list[AsyncKernelClient]]:
    if target == "local":
        return local_kernels(bench.home, n)
    engine = bench.engines[target]
    return docker_kernels(engine.client, bench.home, engine.image, n, engine.remote_host)


@contextlib.asynccontextmanager
async def session(bench: Bench, backend: str) -> AsyncIterator[Session]:
    """Both sides' kernels; at the end both are torn down at once (a docker one takes seconds)."""
    ours, theirs = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
    try:
        client = await ours.enter_async_context(bench.daemon(backend))
        async with cellbox_call(f"a {backend} sandbox with {KERNELS} kernels", 180):
            sandbox = await client.create_sandbox(backend_of(backend))
            kernels = await gather_all(*(sandbox.start_kernel() for _ in range(KERNELS)))
        clients = await theirs.enter_async_context(baseline_kernels(bench, backend, KERNELS))
        yield Session(
            backend, client.pid, [CellboxDriver(k) for k in kernels], [BaselineDriver(kc) for kc in clients]
        )
    finally:
        await gather_all(ours.aclose(), theirs.aclose())


async def guarded(
    case: str, backend: str | None, run: Callable[[], Awaitable[list[Row]]], budget: float = BUDGET
) -> list[Row]:
    """The rows of a case; one failed row if cellbox failed it, one error row if the benchmark did."""
    try:
        async with asyncio.timeout(budget):
            return await run()
    except (CellboxFailed, CellboxError) as exc:
        return [Row(case, backend, "", None, target=Target("completes"), note=str(exc))]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        return [Row(case, backend, "", None, error=error, details={"traceback": traceback.format_exc()})]


def _percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {
        "n": len(ms),
        "min": min(ms),
        "mean": statistics.fmean(ms),
        "p90": _percentile(ms, 90),
        "max": max(ms),
    }


class _Cpu:
    """CPU time of the daemon and of this process (the clients) while each side runs."""

    def __init__(self, daemon_pid: int) -> None:
        self._pid = daemon_pid
        self._used: dict[tuple[str, str], float] = {}

    @contextlib.contextmanager
    def measure(self, side: str) -> Iterator[None]:
        daemon, client = procfs.cpu_seconds(self._pid), time.process_time()
        yield
        used = {"client": time.process_time() - client}
        if side == "cellbox":  # the baseline has no daemon
            used["daemon"] = procfs.cpu_seconds(self._pid) - daemon
        for process, seconds in used.items():
            self._used[side, process] = self._used.get((side, process), 0.0) + seconds

    def per_execute(self, executes: dict[str, int]) -> dict[str, float]:
        """Milliseconds per execute, by side and process, given the executes of each side."""
        return {
            f"{side}_{process}": round(seconds * 1e3 / executes[side], 3)
            for (side, process), seconds in self._used.items()
        }


# -- round trip ------------------------------------------------------------------------------


async def _latencies(driver: Driver, n: int) -> list[float]:
    found = []
    for _ in range(n):
        start = time.perf_counter()
        await driver.execute("1")
        found.append(time.perf_counter() - start)
    return found


async def round_trip(s: Session, plan: Plan) -> list[Row]:
    """`execute("1")` one after the other on one kernel, in blocks taken in turn by each side."""
    cellbox, baseline = s.cellbox[0], s.baseline[0]
    await _latencies(cellbox, WARMUP)
    await _latencies(baseline, WARMUP)
    ours: list[float] = []
    theirs: list[float] = []
    cpu = _Cpu(s.pid)
    while len(ours) < plan.round_trips:
        block = min(BLOCK, plan.round_trips - len(ours))
        with cpu.measure("cellbox"):
            ours += await _latencies(cellbox, block)
        with cpu.measure("baseline"):
            theirs += await _latencies(baseline, block)
    details = {
        "cellbox_ms": _stats_ms(ours),
        "baseline_ms": _stats_ms(theirs),
        "cpu_ms_per_execute": cpu.per_execute({"cellbox": len(ours), "baseline": len(theirs)}),
    }
    return [
        Row(
            f"round trip p{p}",
            s.backend,
            "ms",
            _percentile(ours, p) * 1e3,
            _percentile(theirs, p) * 1e3,
            Target("ratio_max", limit),
            details=details if p == 99 else {},
        )
        for p, limit in ((50, 1.10), (99, 1.25))
    ]


# -- parallel --------------------------------------------------------------------------------


async def _throughput(drivers: Sequence[Driver], window: float, cpu: _Cpu, side: str) -> tuple[int, float]:
    """Executes completed by all `drivers` looping at once, counted over `window` seconds."""
    done = 0
    stop = False

    async def loop(driver: Driver) -> None:
        nonlocal done
        while not stop:
            await driver.execute("1")
            done += 1

    tasks = [asyncio.create_task(loop(d)) for d in drivers]
    try:
        await asyncio.sleep(WARM_WINDOW)
        counted, start = done, time.perf_counter()
        with cpu.measure(side):
            await asyncio.sleep(window)
        counted, seconds = done - counted, time.perf_counter() - start
        stop = True
        await gather_all(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return counted, seconds


async def parallel(s: Session, plan: Plan) -> list[Row]:
    """Executes per second with KERNELS kernels each looping on `execute("1")`."""
    ours = theirs = (0, 0.0)
    cpu = _Cpu(s.pid)
    for _ in range(plan.windows):
        count, seconds = await _throughput(s.cellbox, plan.window, cpu, "cellbox")
        ours = (ours[0] + count, ours[1] + seconds)
        count, seconds = await _throughput(s.baseline, plan.window, cpu, "baseline")
        theirs = (theirs[0] + count, theirs[1] + seconds)
    return [
        Row(
            f"parallel, {KERNELS} kernels",
            s.backend,
            "exec/s",
            ours[0] / ours[1],
            theirs[0] / theirs[1],
            Target("ratio_min", 0.90),
            details={
                "cellbox_executes": ours[0],
                "baseline_executes": theirs[0],
                "seconds_per_side": ours[1],
                "cpu_ms_per_execute": cpu.per_execute({"cellbox": ours[0], "baseline": theirs[0]}),
            },
        )
    ]


# -- streaming and the big line --------------------------------------------------------------


async def _timed_stream(driver: Driver, code: str, expected: int) -> float:
    """Seconds from the request to the end of an execution that prints `expected` bytes."""
    start = time.perf_counter()
    received = await driver.stream(code)
    seconds = time.perf_counter() - start
    if received != expected:
        what = f"{received} of {expected} bytes of output reached the client"
        raise CellboxFailed(what) if isinstance(driver, CellboxDriver) else RuntimeError(what)
    return seconds


def _peak(pid: int, reset: bool) -> tuple[float | None, str]:
    """The daemon's peak RSS since the reset, and a note when it is something else."""
    try:
        peak = procfs.peak_mb(pid)
    except OSError:
        return None, "the daemon is gone"
    return peak, "" if reset else "VmHWM could not be reset: this is the daemon's lifetime peak"


async def streaming(s: Session, plan: Plan) -> list[Row]:
    """One cell printing `stream_mb` MiB in 1 KiB lines: MiB/s of output reaching the client."""
    lines = plan.stream_mb * 1024
    code = f"line = 'x' * 1023\nfor _ in range({lines}):\n    print(line)"
    reset = procfs.reset_peak(s.pid)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(plan.stream_runs):
        ours.append(plan.stream_mb / await _timed_stream(s.cellbox[0], code, lines * 1024))
        theirs.append(plan.stream_mb / await _timed_stream(s.baseline[0], code, lines * 1024))
    peak, note = _peak(s.pid, reset)
    label = f"streaming {plan.stream_mb} MB"
    return [
        Row(
            label,
            s.backend,
            "MB/s",
            statistics.median(ours),
            statistics.median(theirs),
            Target("ratio_min", 0.90),
            details={"cellbox_runs": ours, "baseline_runs": theirs},
        ),
        Row(f"{label}: daemon peak RSS", s.backend, "MB", peak, target=Target("max", 150, "MB"), note=note),
    ]


async def short_lines(s: Session, plan: Plan) -> list[Row]:
    """One cell printing `short_lines` lines of 16 bytes: seconds until the client has them all
    (the cost of bounding a kernel's output, paid per write)."""
    code = f"for i in range({plan.short_lines}):\n    print('%015d' % i)"
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(plan.stream_runs):
        ours.append(await _timed_stream(s.cellbox[0], code, plan.short_lines * 16))
        theirs.append(await _timed_stream(s.baseline[0], code, plan.short_lines * 16))
    return [
        Row(
            f"{plan.short_lines:,} short lines",
            s.backend,
            "s",
            statistics.median(ours),
            statistics.median(theirs),
            Target("ratio_max", 1.0),
            details={"cellbox_runs": ours, "baseline_runs": theirs},
        )
    ]


async def big_line(s: Session, plan: Plan) -> list[Row]:
    """One cell printing a single line of `big_line_mb` MiB: it completes, and the daemon's peak."""
    code = f"print('x' * {plan.big_line_mb * MB})"
    expected = plan.big_line_mb * MB + 1
    reset = procfs.reset_peak(s.pid)
    seconds: float | None = None
    failed = ""
    try:
        seconds = await _timed_stream(s.cellbox[0], code, expected)
    except CellboxFailed as exc:
        failed = str(exc)
    peak, note = _peak(s.pid, reset)
    theirs = await _timed_stream(s.baseline[0], code, expected)
    label = f"big line {plan.big_line_mb} MB"
    return [
        Row(label, s.backend, "s", seconds, theirs, Target("completes"), note=failed),
        Row(f"{label}: daemon peak RSS", s.backend, "MB", peak, target=Target("max", 200, "MB"), note=note),
    ]


# -- starting ---------------------------------------------------------------------------------


async def daemon_start(bench: Bench) -> list[Row]:
    """Spawn to `initialize` result, and the daemon's RSS once it is idle; after one start that
    is not counted, as a first start after installing fills the cache of generated code."""
    async with daemon(bench.home):
        pass
    seconds: list[float] = []
    idle: list[float] = []
    for _ in range(bench.plan.starts):
        start = time.perf_counter()
        async with daemon(bench.home) as client:
            seconds.append(time.perf_counter() - start)
            await asyncio.sleep(SETTLE)
            idle.append(procfs.rss_mb(client.pid))
    return [
        Row(
            "daemon start",
            None,
            "s",
            statistics.median(seconds),
            target=Target("max", 0.3, "s"),
            details={"runs": seconds},
        ),
        Row("daemon idle RSS", None, "MB", max(idle), target=Target("max", 60, "MB"), details={"runs": idle}),
    ]


async def _first_result(client: AsyncClient, backend: str, what: str) -> float:
    """Seconds of createSandbox + startKernel + `execute("print(1)")`."""
    start = time.perf_counter()
    async with cellbox_call(what, 120):
        sandbox = await client.create_sandbox(backend_of(backend))
        await CellboxDriver(await sandbox.start_kernel()).execute("print(1)")
    return time.perf_counter() - start


async def first_result(bench: Bench, backend: str) -> list[Row]:
    """createSandbox + startKernel + `execute("print(1)")` on a fresh daemon, the image present."""
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(bench.plan.first_results):
        async with bench.daemon(backend) as client:
            ours.append(await _first_result(client, backend, f"first result ({backend})"))
        start = time.perf_counter()
        async with baseline_kernels(bench, backend, 1) as (kc,):
            await BaselineDriver(kc).execute("print(1)")
            theirs.append(time.perf_counter() - start)
    limit = 1.5 if backend == "remote" else 1.0
    return [
        Row(
            "first result",
            backend,
            "s",
            statistics.median(ours),
            statistics.median(theirs),
            Target("max", limit, "s"),
            details={"cellbox_runs": ours, "baseline_runs": theirs},
        ),
    ]


async def first_result_pooled(bench: Bench, backend: str) -> list[Row]:
    """The same from a daemon whose warm pool keeps one sandbox ready, once it is ready."""
    ours: list[float] = []
    for _ in range(bench.plan.first_results):
        async with bench.daemon(backend, pool=[PoolSpec(backend_of(backend), size=1)]) as client:
            async with cellbox_call(f"the warm pool ({backend}) filling", 300):
                # the pool's state is there to be asked, not announced
                while not (await client.pool_status())[0].ready:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            ours.append(await _first_result(client, backend, f"first result from the warm pool ({backend})"))
    return [
        Row(
            "first result, warm pool",
            backend,
            "s",
            statistics.median(ours),
            target=Target("max", 0.15 if backend == "local" else 0.02, "s"),
            details={"cellbox_runs": ours},
        )
    ]


# -- churn ------------------------------------------------------------------------------------


async def _footprint(bench: Bench, backend: str, pid: int) -> dict[str, float]:
    await asyncio.sleep(SETTLE)
    found: dict[str, float] = {
        "rss": procfs.rss_mb(pid),
        "fds": procfs.fds(pid),
        "children": procfs.descendants(pid),
        "threads": procfs.threads(pid),
    }
    if backend in bench.engines:
        mine = {"label": f"{LABEL_DAEMON_PID}={pid}"}
        engine = bench.engines[backend].client
        found["containers"] = len(await asyncio.to_thread(engine.containers.list, all=True, filters=mine))
    return found


async def churn(bench: Bench, backend: str, total: int) -> list[Row]:
    """`total` sandboxes created, used (one execute) and destroyed: the daemon must not grow."""
    warm = max(2, total // 8)
    async with bench.daemon(backend) as client:
        slots = asyncio.Semaphore(CHURN_CONCURRENCY)

        async def life() -> None:
            async with slots, cellbox_call(f"a {backend} sandbox's life", 120):
                sandbox = await client.create_sandbox(backend_of(backend))
                try:
                    await CellboxDriver(await sandbox.start_kernel()).execute("1")
                finally:
                    await sandbox.destroy()

        started = time.perf_counter()
        await gather_all(*(life() for _ in range(warm)))
        before = await _footprint(bench, backend, client.pid)
        await gather_all(*(life() for _ in range(total - warm)))
        after = await _footprint(bench, backend, client.pid)
        seconds = time.perf_counter() - started
    details: dict[str, Any] = {
        "sandboxes": total,
        "warmup": warm,
        "seconds": seconds,
        "threads": {"before": before["threads"], "after": after["threads"]},
    }
    rows = [
        Row(
            f"churn {total}: daemon RSS",
            backend,
            "MB",
            after["rss"],
            before=before["rss"],
            target=Target("growth", 1.10),
            details=details,
        ),
        Row(
            f"churn {total}: daemon fds",
            backend,
            "",
            after["fds"],
            before=before["fds"],
            target=Target("growth", 1.0),
        ),
        Row(
            f"churn {total}: child processes",
            backend,
            "",
            after["children"],
            before=before["children"],
            target=Target("growth", 1.0),
        ),
    ]
    if backend in bench.engines:
        rows.append(
            Row(
                f"churn {total}: containers",
                backend,
                "",
                after["containers"],
                before=before["containers"],
                target=Target("growth", 1.0),
            )
        )
    return rows


# -- fairness and scale -----------------------------------------------------------------------


async def _discard(execution: AsyncExecution, flowing: asyncio.Event) -> None:
    async for _ in execution:
        flowing.set()


async def fairness(bench: Bench, backend: str, plan: Plan) -> list[Row]:
    """While FLOODERS sandboxes print and display without end, another sandbox's `execute("1")`
    and the daemon's own `listSandboxes`: their p50 and p99."""
    kind = backend_of(backend)
    async with bench.daemon(backend) as client:
        async with cellbox_call(f"{FLOODERS + 1} {backend} sandboxes", 300):
            flooders = [await (await client.create_sandbox(kind)).start_kernel() for _ in range(FLOODERS)]
            quiet = CellboxDriver(await (await client.create_sandbox(kind)).start_kernel())
        floods = [kernel.stream(FLOOD) for kernel in flooders]
        started = [asyncio.Event() for _ in floods]
        readers = [asyncio.create_task(_discard(f, e)) for f, e in zip(floods, started, strict=True)]
        executes: list[float] = []
        listings: list[float] = []
        try:
            async with cellbox_call("the floods' first output", 120):
                await gather_all(*(event.wait() for event in started))
            await _latencies(quiet, WARMUP)
            for _ in range(plan.fair_rounds):
                executes += await _latencies(quiet, 1)
                before = time.perf_counter()
                async with cellbox_call("listSandboxes while floods run", 60):
                    await client.list_sandboxes()
                listings.append(time.perf_counter() - before)
            flooding = not any(reader.done() for reader in readers)
        finally:
            with contextlib.suppress(CellboxError):
                await gather_all(*(kernel.interrupt() for kernel in flooders))
            await asyncio.wait(readers, timeout=60)
            for reader in readers:
                reader.cancel()
    if not flooding:
        raise CellboxFailed("a flood ended before the executes did")
    label = f"fairness, {FLOODERS} flooding"
    target = Target("max", 250, "ms")
    return [
        Row(f"{label}: execute p50", backend, "ms", _percentile(executes, 50) * 1000),
        Row(f"{label}: execute p99", backend, "ms", _percentile(executes, 99) * 1000, target=target),
        Row(f"{label}: listSandboxes p99", backend, "ms", _percentile(listings, 99) * 1000, target=target),
    ]


async def scale(bench: Bench, backend: str, count: int) -> list[Row]:
    """`count` sandboxes with a running kernel each on one daemon: its RSS, and its fds and
    threads per sandbox past the first quarter (which fills the daemon's pools of threads and
    connections); every kernel answering; a new sandbox's first result under that load."""
    kind = backend_of(backend)
    warm = max(1, count // 4)
    async with bench.daemon(backend) as client:
        slots = asyncio.Semaphore(CHURN_CONCURRENCY)
        drivers: list[CellboxDriver] = []

        async def make() -> None:
            async with slots, cellbox_call(f"a {backend} sandbox of {count}", 120):
                driver = CellboxDriver(await (await client.create_sandbox(kind)).start_kernel())
                await driver.execute("1")
                drivers.append(driver)

        await gather_all(*(make() for _ in range(warm)))
        warmed = await _footprint(bench, backend, client.pid)
        await gather_all(*(make() for _ in range(count - warm)))
        loaded = await _footprint(bench, backend, client.pid)
        async with cellbox_call(f"an execute on each of {count} kernels", 300):
            await gather_all(*(driver.execute("1") for driver in drivers))
        first = [
            await _first_result(client, backend, f"a first result among {count} sandboxes")
            for _ in range(bench.plan.first_results)
        ]
    label = f"scale {count}"
    per = {key: (loaded[key] - warmed[key]) / (count - warm) for key in ("fds", "threads")}
    return [
        Row(f"{label}: daemon RSS", backend, "MB", loaded["rss"], target=Target("max", 150, "MB")),
        # a sandbox's channel: the agent's three pipes and its pidfd (local); the exec session,
        # and the agent's socket where it has one (docker)
        Row(f"{label}: daemon fds", backend, "per sandbox", per["fds"], target=Target("max", 4)),
        Row(f"{label}: daemon threads", backend, "per sandbox", per["threads"], target=Target("max", 0)),
        Row(f"{label}: first result", backend, "s", statistics.median(first), target=Target("max", 2.0, "s")),
    ]
