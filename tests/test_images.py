"""Docker images: `cellboxd.images` against a real engine, and the `build` and `images` commands.

The engine tests need a Docker engine (DOCKER_HOST) with the base image $CELLBOX_BASE_IMAGE on
it, and PyPI from inside containers (through $CELLBOX_CA_BUNDLE where a TLS-inspecting proxy is
in the way). Without an engine they skip, unless CELLBOX_REQUIRE_DOCKER=1 makes them fail.
Every image they build is tagged under one repository name of this run, and removed at the end
with the build steps a failed or cancelled build left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import docker
import docker.errors
import pytest

from cellbox import __version__, errors
from cellbox import types as t
from cellboxd.backends.docker import images
from cellboxd.backends.docker.dependencies import parse_dependencies, variant_dependencies
from tests.conftest import docker_unavailable
from tests.rpc import Daemon

CELLBOX = [sys.executable, "-m", "cellboxd"]
REPOSITORY = f"cellbox-test-images-{uuid.uuid4().hex[:8]}"
# an id the legacy builder prints for each step's image: " ---> 0123456789ab"
_STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12})$")


def _tag(name: str) -> str:
    return f"{REPOSITORY}:{name}"


@pytest.fixture(scope="module")
def engine(docker_engine: None) -> Iterator[docker.DockerClient]:
    """The Docker engine (conftest's `docker_engine` skips, or fails, when none answers)."""
    client = docker.from_env(timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def base_image(engine: docker.DockerClient) -> str:
    name = os.environ.get("CELLBOX_BASE_IMAGE") or images.DEFAULT_BASE_IMAGE
    if images.find_image(engine, name) is None:
        docker_unavailable(
            f"the base image {name} is not on the engine (no registry reachable here to pull it from)"
        )
    return name


class Leftovers:
    """Ids of the step images the builds printed, to remove those no image needs at the end."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def add(self, lines: list[str]) -> None:
        self.ids.extend(m.group(1) for line in lines if (m := _STEP_IMAGE.match(line)))


@pytest.fixture(scope="module")
def leftovers(engine: docker.DockerClient) -> Iterator[Leftovers]:
    found = Leftovers()
    yield found
    for image in engine.images.list(name=REPOSITORY):
        # only this run's tags: an image built from the cache can be someone else's image too
        for tag in (tag for tag in image.tags if tag.startswith(f"{REPOSITORY}:")):
            with contextlib.suppress(docker.errors.APIError):
                engine.images.remove(tag)  # untags it; removes it and its steps when nothing else needs them
    for image_id in reversed(found.ids):
        image = images.find_image(engine, image_id)
        if image is not None and not image.tags:  # never an image someone tagged
            with contextlib.suppress(docker.errors.APIError):  # another image or a container needs it
                engine.images.remove(image_id)


class Built(NamedTuple):
    result: t.BuildImageResult
    lines: list[str]
    seconds: float


def build(engine: docker.DockerClient, leftovers: Leftovers, base_image: str | None, **params: Any) -> Built:
    """Runs `build_image` in a fresh event loop, collecting its lines."""
    lines: list[str] = []
    start = time.monotonic()
    try:
        result = asyncio.run(
            images.build_image(
                engine, t.BuildImageParams(base_image=base_image, **params), on_line=lines.append
            )
        )
    finally:
        leftovers.add(lines)
    return Built(result, lines, time.monotonic() - start)


def run_in(engine: docker.DockerClient, image: str, script: str) -> str:
    output: bytes = engine.containers.run(image, ["sh", "-c", script], remove=True)
    return output.decode()


def expected_uid_gid() -> tuple[int, int]:
    return (1000, 1000) if os.getuid() == 0 else (os.getuid(), os.getgid())


@pytest.fixture(scope="module")
def minimal(engine: docker.DockerClient, leftovers: Leftovers, base_image: str) -> Built:
    """The minimal variant, built once for the module."""
    return build(engine, leftovers, base_image, variant="minimal", tag=_tag("minimal"))


# --- without an engine ---------------------------------------------------------------------


def test_default_tags() -> None:
    assert images.default_tag("basic", variant_dependencies("basic")) == f"cellbox-basic:{__version__}"
    tinydb = parse_dependencies('tinydb = "^4.8"\n')
    custom = images.default_tag(None, tinydb)
    assert re.fullmatch(r"cellbox-custom:[0-9a-f]{12}", custom)
    assert images.default_tag(None, parse_dependencies('tinydb = "^4.8"  # again\n')) == custom
    assert images.default_tag(None, parse_dependencies('tinydb = "^4.9"\n')) != custom


def test_dockerfile_puts_the_venv_before_the_requirements() -> None:
    text = images.render_dockerfile("base:1", user=(1234, 2345), ca_bundle=True, requirements=True)
    lines = text.splitlines()
    assert lines[0] == "FROM base:1"

    def index(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    ca, user, venv = index("COPY ca-bundle.crt"), index("USER 1234:2345"), index("RUN python3 -m venv")
    requirements = index("COPY requirements.txt")
    assert ca < user < venv < requirements < index("RUN pip install") < index("WORKDIR /workspace")
    assert "--uid 1234 --gid 2345" in text
    assert "PIP_CERT=/etc/cellbox/ca-bundle.crt" in text and "REQUESTS_CA_BUNDLE=" in text
    assert "ENV PATH=/opt/cellbox/packages/bin:/opt/cellbox/venv/bin:" in text
    assert "PYTHONPATH=/workspace/skills" in text
    # no setuid or setgid binaries, cleared before the image's user is made
    assert index("RUN find / -xdev -type f -perm /6000 -exec chmod a-s") < user
    # runtime installs go to their own prefix, which the venv puts ahead of its own packages
    assert "mkdir -p /opt/cellbox /opt/cellbox/packages " in text
    assert (
        'shutil.copy("/opt/cellbox/cellbox-packages.pth", sysconfig.get_paths()["purelib"])'
        in lines[venv + 2]
    )

    plain = images.render_dockerfile("base:1", user=None)
    assert "useradd" not in plain
    assert [line for line in plain.splitlines() if line.startswith("USER")] == ["USER root"]
    assert "requirements" not in plain and "ca-bundle" not in plain


def test_the_image_user_is_the_host_user_unless_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 1234)
    monkeypatch.setattr(os, "getgid", lambda: 100)
    assert images._image_user(root=False) == (1234, 100)
    assert images._image_user(root=True) is None
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    assert images._image_user(root=False) == (1000, 1000)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"variant": "basic", "dependencies": 'tinydb = "^4.8"'}, errors.InvalidParams),
        ({"tag": "Not A Tag"}, errors.InvalidParams),
        ({"dependencies": 'tinydb = "^4.8"\nnot toml\n'}, errors.InvalidDependencies),
        ({"dependencies": 'tool = {path = "/"}'}, errors.InvalidDependencies),
    ],
)
def test_bad_params_fail_before_the_engine_is_asked(params: dict[str, Any], error: type[Exception]) -> None:
    lines: list[str] = []
    with pytest.raises(error):
        # no client at all: nothing may reach an engine
        asyncio.run(images.build_image(None, t.BuildImageParams(**params), on_line=lines.append))
    assert lines == []


# --- against the engine --------------------------------------------------------------------


def test_build_minimal(engine: docker.DockerClient, minimal: Built) -> None:
    assert minimal.result.tag == _tag("minimal") and minimal.result.built
    image = engine.images.get(_tag("minimal"))
    assert image.id == minimal.result.image_id
    uid, gid = expected_uid_gid()
    labels = image.labels
    assert labels[images.IMAGE_LABEL] == "1"
    assert labels["cellbox.version"] == __version__
    assert labels["cellbox.variant"] == "minimal"
    assert re.fullmatch(r"[0-9a-f]{64}", labels["cellbox.hash"])
    assert (labels["cellbox.uid"], labels["cellbox.gid"], labels["cellbox.user"]) == (
        str(uid),
        str(gid),
        "cellbox",
    )
    assert any("Successfully tagged" in line for line in minimal.lines)


def test_rebuild_of_an_unchanged_image_returns_at_once(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built
) -> None:
    again = build(engine, leftovers, base_image, variant="minimal", tag=_tag("minimal"))
    assert again.result == t.BuildImageResult(_tag("minimal"), minimal.result.image_id, built=False)
    assert again.lines == []
    assert again.seconds < 2


def test_the_image_runs_as_the_host_user_with_ipykernel(engine: docker.DockerClient, minimal: Built) -> None:
    output = run_in(
        engine,
        _tag("minimal"),
        "id -u; id -g; id -un; echo $HOME; pwd; echo $PYTHONPATH; command -v python;"
        ' python -c "import ipykernel, sys; print(sys.prefix)";'
        " test -w /opt/cellbox/venv/lib/python3*/site-packages && echo venv-writable;"
        " test -w /workspace/skills && test -w /workspace/images && echo workspace-writable",
    )
    uid, gid = expected_uid_gid()
    assert output.split() == [
        str(uid),
        str(gid),
        "cellbox",
        "/home/cellbox",
        "/workspace",
        "/workspace/skills",
        "/opt/cellbox/venv/bin/python",
        "/opt/cellbox/venv",
        "venv-writable",
        "workspace-writable",
    ]
    assert uid != 0


def test_pip_installs_at_runtime_as_the_user(engine: docker.DockerClient, minimal: Built) -> None:
    """The CA bundle is there at run time too, and the venv is the user's."""
    output = run_in(
        engine,
        _tag("minimal"),
        "pip install --no-cache-dir --quiet tinydb 2>&1 && python -c 'import tinydb; print(tinydb.__file__)'",
    )
    assert output.strip().endswith("/opt/cellbox/venv/lib/python3.11/site-packages/tinydb/__init__.py"), (
        output
    )


def test_changed_dependencies_rebuild_on_the_cached_venv(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built
) -> None:
    first = build(
        engine, leftovers, base_image, dependencies='python = "^3.11"\ntinydb = "^4.8"\n', tag=_tag("deps")
    )
    assert first.result.built
    assert any(line.startswith("Python 3.") and "satisfies" in line for line in first.lines)
    venv_step = next(i for i, line in enumerate(first.lines) if "RUN python3 -m venv" in line)
    assert first.lines[venv_step + 1] == " ---> Using cache", "the venv layer of the minimal build is reused"

    second = build(
        engine, leftovers, base_image, dependencies='tinydb = "^4.8"\nsix = "^1.16"\n', tag=_tag("deps")
    )
    assert second.result.built and second.result.image_id != first.result.image_id
    new = engine.images.get(_tag("deps"))
    assert new.labels["cellbox.hash"] != engine.images.get(_tag("minimal")).labels["cellbox.hash"]
    assert "cellbox.variant" not in new.labels
    old = images.find_image(engine, first.result.image_id)
    assert old is None or old.tags, "the image the tag left is removed unless tagged otherwise"
    assert run_in(engine, _tag("deps"), "python -c 'import six, tinydb; print(\"ok\")'").strip() == "ok"


def test_invalid_dependencies_fail_before_any_build(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str
) -> None:
    with pytest.raises(errors.InvalidDependencies) as caught:
        build(engine, leftovers, base_image, dependencies='tinydb = "^4.8"\nbroken = \n', tag=_tag("invalid"))
    assert caught.value.data is not None and caught.value.data["line"] == "broken ="
    assert images.find_image(engine, _tag("invalid")) is None


def test_a_missing_base_image_is_build_failed(engine: docker.DockerClient, leftovers: Leftovers) -> None:
    missing = f"{REPOSITORY}-no-such-base:1"
    with pytest.raises(errors.BuildFailed) as caught:
        build(engine, leftovers, missing, variant="minimal", tag=_tag("nobase"))
    assert missing in caught.value.message and "pull" in caught.value.message
    assert images.find_image(engine, _tag("nobase")) is None


def test_a_python_constraint_the_base_does_not_meet_is_build_failed(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str
) -> None:
    with pytest.raises(errors.BuildFailed) as caught:
        build(engine, leftovers, base_image, dependencies='python = ">=3.99"\n', tag=_tag("python"))
    assert ">=3.99" in caught.value.message and "has Python 3." in caught.value.message
    assert images.find_image(engine, _tag("python")) is None


def test_a_failing_install_is_build_failed_with_the_log(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built
) -> None:
    with pytest.raises(errors.BuildFailed) as caught:
        build(
            engine,
            leftovers,
            base_image,
            dependencies='cellbox-test-no-such-package = "^1"\n',
            tag=_tag("fail"),
        )
    assert caught.value.data is not None
    log = caught.value.data["log"]
    leftovers.add(log.splitlines())
    assert "No matching distribution found for cellbox-test-no-such-package" in log
    assert "No matching distribution" in caught.value.message
    assert images.find_image(engine, _tag("fail")) is None


def test_root_keeps_root(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built
) -> None:
    built = build(engine, leftovers, base_image, variant="minimal", root=True, tag=_tag("root"))
    assert built.result.built
    assert engine.images.get(_tag("root")).labels["cellbox.user"] == "root"
    assert run_in(engine, _tag("root"), "id -u; echo $HOME; python -c 'import ipykernel'").split() == [
        "0",
        "/home/cellbox",
    ]


def test_cancelling_a_build_stops_it(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str
) -> None:
    tag = _tag("cancelled")
    lines: list[str] = []

    async def cancel_when_the_requirements_install() -> None:
        installing = asyncio.Event()

        def on_line(line: str) -> None:
            lines.append(line)
            if line.startswith("Step ") and "RUN pip install" in line:
                installing.set()

        # a requirement no other test has, so that its step is not in the cache
        params = t.BuildImageParams(base_image=base_image, dependencies='tinydb = "==4.8.0"\n', tag=tag)
        task = asyncio.create_task(images.build_image(engine, params, on_line=on_line))
        await installing.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_when_the_requirements_install())
    deadline = time.monotonic() + 60
    while any(thread.name == f"cellbox-build {tag}" for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "the build thread did not stop"
        time.sleep(0.1)
    leftovers.add(lines)
    time.sleep(2)  # the engine abandons the build when it sees the connection closed
    assert images.find_image(engine, tag) is None


def test_list_images(engine: docker.DockerClient, minimal: Built) -> None:
    listed = {info.tag: info for info in images.list_images(engine)}
    info = listed[_tag("minimal")]
    assert info.image_id == minimal.result.image_id and info.variant == "minimal"
    created = datetime.datetime.fromisoformat(info.created_at)
    assert created.utcoffset() == datetime.timedelta(0)
    assert f"{REPOSITORY}-no-such-base:1" not in listed
    assert all(engine.images.get(tag).labels.get(images.IMAGE_LABEL) for tag in listed)


# --- the `build` and `images` commands, through a daemon ----------------------------------------
# These need the daemon's cellbox/buildImage and cellbox/listImages (server.py); before they were
# wired, the daemon answered BackendUnavailable and these failed.


def cellbox(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CELLBOX, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_help_of_build_and_images() -> None:
    done = cellbox("build", "--help")
    assert done.returncode == 0
    for text in (
        "--variant",
        "--dependencies FILE",
        "--tag TAG",
        "--base-image IMAGE",
        "--root",
        "examples:",
    ):
        assert text in done.stdout
    done = cellbox("images", "--help")
    assert done.returncode == 0 and "examples:" in done.stdout
    assert "build" in cellbox("--help").stdout
    assert cellbox("build", "--variant", "basic", "--dependencies", "x").returncode == 2


def test_cli_build_then_images(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built
) -> None:
    tag = _tag("cli")
    done = cellbox("build", "--variant", "minimal", "--tag", tag, "--base-image", base_image)
    leftovers.add(done.stderr.splitlines())
    assert done.returncode == 0, done.stderr
    image_id = engine.images.get(tag).id
    assert done.stdout == f"{tag} {image_id} built\n"

    done = cellbox("build", "--variant", "minimal", "--tag", tag, "--base-image", base_image)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tag} {image_id} up to date\n"

    done = cellbox("images")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(f"{tag} "))
    assert row.split()[1:3] == [image_id.removeprefix("sha256:")[:12], "minimal"]


def test_cli_build_failure_shows_the_log(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, minimal: Built, tmp_path: Path
) -> None:
    deps = tmp_path / "deps.txt"
    deps.write_text('cellbox-test-no-such-package = "^1"\n')
    done = cellbox("build", "--dependencies", str(deps), "--tag", _tag("clifail"), "--base-image", base_image)
    leftovers.add(done.stderr.splitlines())
    assert done.returncode == 1
    assert "No matching distribution found for cellbox-test-no-such-package" in done.stderr
    assert f"cellbox: building {_tag('clifail')} failed" in done.stderr


def test_cli_invalid_dependencies(engine: docker.DockerClient, tmp_path: Path) -> None:
    deps = tmp_path / "deps.txt"
    deps.write_text('tinydb = "^4.8"\nnot toml\n')
    done = cellbox("build", "--dependencies", str(deps), "--tag", _tag("cliinvalid"))
    assert done.returncode == 1
    assert f"cellbox: {deps}: line 2" in done.stderr
    assert images.find_image(engine, _tag("cliinvalid")) is None
    done = cellbox("build", "--dependencies", str(tmp_path / "missing.txt"))
    assert done.returncode == 1 and "cannot read" in done.stderr


# --- pulls, from a registry on this machine -------------------------------------------------


@pytest.fixture(scope="module")
def registry(engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (an engine pulls from loopback without TLS); its
    address. The tests push what they pull from it."""
    binary = shutil.which("docker-registry")
    if binary is None:
        docker_unavailable("no docker-registry (Debian's package docker-registry) to pull from")
    folder = tmp_path_factory.mktemp("registry")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (folder / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n"
    )
    proc = subprocess.Popen([str(binary), "serve", str(folder / "config.yml")], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1),
            ):
                break
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _push_unique_base(engine: docker.DockerClient, base_image: str, registry: str) -> str:
    """A base image only the registry has: the base plus a layer of random bytes, pushed and
    then untagged here, so that a pull has something to download."""
    reference = f"{registry}/{REPOSITORY}-base:{secrets.token_hex(4)}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, content in (
            ("noise", os.urandom(3 << 20)),
            ("Dockerfile", f"FROM {base_image}\nCOPY noise /noise\n".encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    context.seek(0)
    engine.images.build(fileobj=context, custom_context=True, tag=reference, rm=True)
    for line in engine.images.push(reference, stream=True, decode=True):
        assert "error" not in line, line
    engine.images.remove(reference)
    assert images.find_image(engine, reference) is None
    return reference


def test_a_base_image_that_is_absent_is_pulled_with_progress(
    engine: docker.DockerClient, leftovers: Leftovers, base_image: str, registry: str
) -> None:
    reference = _push_unique_base(engine, base_image, registry)
    try:
        built = build(engine, leftovers, reference, variant="minimal", tag=_tag("pulled"))
        assert built.result.built
        pulling = [line for line in built.lines if line.startswith(f"pulling {reference}")]
        assert pulling[0] == f"pulling {reference}" and f"pulled {reference}" in built.lines
        assert any(line.endswith("(100%)") for line in pulling), pulling
        assert images.find_image(engine, reference) is not None
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.images.remove(reference, force=True)


def test_a_sandbox_image_that_is_absent_is_pulled(
    engine: docker.DockerClient, minimal: Built, registry: str
) -> None:
    """createSandbox pulls an image the engine lacks, as `docker run` does, reporting progress."""
    reference = f"{registry}/{REPOSITORY}-sandbox:1"
    engine.images.get(minimal.result.image_id).tag(reference)
    for line in engine.images.push(reference, stream=True, decode=True):
        assert "error" not in line, line
    engine.images.remove(reference)
    try:
        with Daemon() as d:
            created = d.request(
                "cellbox/createSandbox",
                {"backend": "docker", "image": reference, "workDoneToken": "p"},
                timeout=300,
            )
            assert created["image"] == reference
            reports = [p["value"].get("message", "") for p in d.notes("$/progress") if p["token"] == "p"]
            assert f"pulling {reference}" in reports and f"pulled {reference}" in reports
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.images.remove(reference, force=True)
