"""Shared fixtures: the daemons of a test session keep their state in a temporary folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rpc import Daemon


@pytest.fixture(scope="session", autouse=True)
def cellbox_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points the daemon's data, config, cache and log dirs at a fresh temporary folder."""
    home = tmp_path_factory.mktemp("cellbox-home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("data", "cache", "log"):
            (home / name).mkdir()
            mp.setenv(f"CELLBOX_{name.upper()}_DIR", str(home / name))
        mp.setenv("CELLBOX_CONFIG", str(home / "config.toml"))
        mp.setenv("CELLBOX_RUNTIME_DIR", str(runtime_dir(home)))
        mp.delenv("CELLBOX_DEFAULT_BACKEND", raising=False)
        yield home


def runtime_dir(home: Path) -> Path:
    """The daemons' runtime dir: a local agent keeps its kernels' sockets in a folder of it."""
    return home / "run"


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with Daemon() as d:
        yield d


@pytest.fixture(scope="module")
def shared_daemon(cellbox_home: Path) -> Iterator[Daemon]:
    """One daemon for a module's tests that do not change what the others see."""
    with Daemon() as d:
        yield d


def new_kernel(d: Daemon, **sandbox: object) -> tuple[str, str]:
    """A new sandbox with one kernel: (sandboxId, kernelId)."""
    sandbox_id = d.request("cellbox/createSandbox", sandbox)["sandboxId"]
    kernel_id = d.request("cellbox/startKernel", {"sandboxId": sandbox_id})["kernelId"]
    return sandbox_id, kernel_id


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skips a test when no Docker engine answers; with CELLBOX_REQUIRE_DOCKER=1 that fails it."""
    import docker

    try:
        docker.from_env(timeout=5).ping()
    except Exception as exc:
        docker_unavailable(
            f"no Docker engine reachable ({exc}); run ../shared/docker/provision and export its lines"
        )


def unavailable(reason: str, require: str) -> None:
    """A skip with the reason, or a failure where the variable `require`=1 wants the tests run (CI)."""
    if os.environ.get(require) == "1":
        pytest.fail(f"{require}=1 but {reason}")
    pytest.skip(reason)


def docker_unavailable(reason: str) -> None:
    unavailable(reason, "CELLBOX_REQUIRE_DOCKER")
