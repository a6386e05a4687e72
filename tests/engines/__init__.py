"""The Docker engines the docker tests run on, each a way users reach one.

`local` is the engine `DOCKER_HOST` names (../shared/docker/provision's). The others are made by
`tests/engines/up` (CI runs it), which writes a JSON file, named by `CELLBOX_TEST_ENGINES`, of
`{name: {"env": {...}, "api": URL}}`: the environment that points a daemon at the engine, and
where a test inspects it. A missing engine skips its tests, or fails them where
`CELLBOX_REQUIRE_DOCKER=1` (CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import docker

from tests.conftest import docker_unavailable

# what each engine stands for
ENGINES = {
    "local": "Docker Engine on the daemon's machine",
    "local-exec": "the same, its sandboxes' channels on exec sessions, not the daemon's socket",
    "tcp": "a remote engine over tcp://, sharing nothing with the daemon",
    "ssh": "the remote engine over ssh://",
    "desktop": "Docker Desktop's shape: an engine in its own machine behind a local unix socket, "
    "a folder shared into it",
    "podman": "Podman's Docker-compatible API, as root",
    "podman-rootless": "Podman's Docker-compatible API, rootless",
    "runsc": "gVisor's runsc as the sandboxes' OCI runtime",
}
SHARED = "/tmp/cellbox-share"  # a folder of the daemon's machine every engine can mount


@dataclass
class Engine:
    name: str
    env: dict[str, str]
    api: str
    facts: dict[str, Any] = field(default_factory=dict)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(
            base_url=self.api, timeout=60, use_ssh_client=self.api.startswith("ssh://")
        )

    @property
    def enforces_limits(self) -> bool:
        """False where the engine cannot enforce resource limits (rootless Podman on cgroup v1)."""
        return bool(self.facts.get("limits", True))

    @property
    def runtime(self) -> str | None:
        return self.env.get("CELLBOX_DOCKER_RUNTIME") or None

    @property
    def socket_channel(self) -> bool:
        """Whether sandboxes' channels take the daemon's socket (an engine on this machine, run
        by root or the daemon's user, the exec session not asked for) rather than the engine's
        exec session."""
        if self.env.get("CELLBOX_DOCKER_CHANNEL") == "exec" or not self.api.startswith("unix://"):
            return False
        with contextlib.closing(self.client()) as client:
            if client.info().get("Name") != socket.gethostname():
                return False
        return os.stat(self.api.removeprefix("unix://")).st_uid in (0, os.getuid())


def engine(name: str) -> Engine:
    """The engine of that name, or a skip (a failure under CELLBOX_REQUIRE_DOCKER=1)."""
    if name in ("local", "local-exec"):
        found: dict[str, Any] | None = {
            "env": {"CELLBOX_DOCKER_CHANNEL": "exec"} if name == "local-exec" else {},
            "api": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        }
    else:
        path = os.environ.get("CELLBOX_TEST_ENGINES")
        try:
            with open(path or "") as file:
                found = json.load(file).get(name)
        except OSError:
            found = None
    if found is None:
        docker_unavailable(f"no {name} engine ({ENGINES[name]}): run tests/engines/up and export its line")
        raise AssertionError  # not reached
    made = Engine(name, dict(found.get("env", {})), found["api"], dict(found.get("facts", {})))
    try:
        made.client().ping()
    except Exception as exc:
        docker_unavailable(f"the {name} engine at {made.api} does not answer ({exc})")
    return made
