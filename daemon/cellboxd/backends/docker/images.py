"""The Docker images sandboxes run in: built from a user's dependencies, found and listed by label.

An image is the base image plus a virtual environment at `/opt/cellbox/venv` holding ipykernel
and the requirements, run by a non-root user `cellbox` whose UID/GID are the daemon's user's,
so that files kernels write to a folder mounted from the engine's machine belong to that user.
Its setuid and setgid bits are cleared. Packages installed at runtime go to `/opt/cellbox/packages`
(a volume of each sandbox, the root file system being read-only), which a `.pth` file of the
venv puts on `sys.path` ahead of the image's own packages. Every image carries `cellbox.*`
labels; `cellbox.hash` covers all that shapes the image, so that a build whose image is already
there returns at once. A base image that is not on the engine is pulled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import threading
import time
from collections.abc import Callable
from typing import Any, Final, get_args

import docker
import docker.errors
import docker.utils
from poetry.core.constraints.version import Version, parse_constraint

from cellbox import __version__, errors
from cellbox import types as t
from cellboxd.backends.docker.dependencies import (
    Dependencies,
    parse_dependencies,
    requirements_hash,
    variant_dependencies,
)

DEFAULT_BASE_IMAGE: Final = "python:3.11-slim"
IMAGE_LABEL: Final = "cellbox.image"
LABEL_VERSION: Final = "cellbox.version"
LABEL_HASH: Final = "cellbox.hash"
LABEL_VARIANT: Final = "cellbox.variant"
LABEL_UID: Final = "cellbox.uid"
LABEL_GID: Final = "cellbox.gid"
LABEL_USER: Final = "cellbox.user"

VENV: Final = "/opt/cellbox/venv"
PYTHON: Final = f"{VENV}/bin/python"
PACKAGES: Final = "/opt/cellbox/packages"  # runtime installs: `pip install --prefix` there
HOME: Final = "/home/cellbox"
WORKSPACE: Final = "/workspace"
CA_BUNDLE: Final = "/etc/cellbox/ca-bundle.crt"
IPYKERNEL: Final = "ipykernel>=6.29,<8"
USER_NAME: Final = "cellbox"
# used when the daemon runs as root (see _image_user)
FALLBACK_UID: Final = 1000

_DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PIP_INSTALL: Final = "pip install --no-cache-dir --no-input --progress-bar off"
_VARIANTS: Final = frozenset(get_args(t.Variant))
_LOCAL_FILE: Final = re.compile(r"@\s*file:", re.IGNORECASE)
# in the venv's site-packages: PACKAGES' site dir (and its .pth files) ahead of the venv's own
_PACKAGES_PTH: Final = (
    "import site, sys; n = len(sys.path); "
    f'site.addsitedir("{PACKAGES}/lib/python%d.%d/site-packages" % sys.version_info[:2]); '
    "added = sys.path[n:]; del sys.path[n:]; "
    'at = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path)); '
    "sys.path[at:at] = added\n"
)
# an image name and optional tag, as Docker's reference grammar has them
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN: Final = (
    r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
)
_REFERENCE: Final = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?")
_REFERENCE_MAX: Final = 255
# the legacy builder colours a step's stderr; its own lines are not the output of a step
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BUILDER_LINE: Final = re.compile(r"\s*$| ---> |Removing intermediate container |Step \d+/\d+ : ")


def default_tag(variant: str | None, deps: Dependencies) -> str:
    """`cellbox-<variant>:<cellbox version>`, or `cellbox-custom:<12 hex of the requirements' hash>`."""
    if variant is not None:
        return f"cellbox-{variant}:{__version__}"
    return f"cellbox-custom:{requirements_hash(deps)[:12]}"


def find_image(client: docker.DockerClient, tag: str) -> Any:
    """The engine's image of that name or id (cellbox's or not), or None."""
    try:
        return client.images.get(tag)
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as exc:
        if exc.status_code == 400:  # not a valid reference: it names no image
            return None
        raise


def pull(client: docker.DockerClient, reference: str, on_line: Callable[[str], None]) -> Any:
    """Pulls an image, reporting how far it got (at most a line a second, and each layer done);
    the image, or ImageNotFound saying why it cannot be had."""
    repository, tag = docker.utils.parse_repository_tag(reference)
    on_line(f"pulling {reference}")
    layers: dict[str, tuple[int, int]] = {}  # layer -> (bytes done, bytes in all)
    last = 0.0
    try:
        for item in client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if "error" in item:
                raise errors.ImageNotFound(f"cannot be pulled: {item['error']}", {"image": reference})
            layer, status = item.get("id"), item.get("status", "")
            detail = item.get("progressDetail") or {}
            if layer and status == "Downloading" and detail.get("total"):
                layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
            elif (
                layer
                and status in ("Download complete", "Pull complete", "Already exists")
                and layer in layers
            ):
                layers[layer] = (layers[layer][1], layers[layer][1])
            now = time.monotonic()
            if layers and (now - last >= 1.0 or status == "Pull complete"):
                last = now
                done, total = (sum(part) for part in zip(*layers.values(), strict=True))
                on_line(
                    f"pulling {reference}: {done / 2**20:.1f}/{total / 2**20:.1f} MB "
                    f"({100 * done // max(total, 1)}%)"
                )
    except docker.errors.APIError as exc:
        raise errors.ImageNotFound(
            f"cannot be pulled: {exc.explanation or exc}", {"image": reference}
        ) from None
    image = find_image(client, reference)
    if image is None:
        raise errors.ImageNotFound(f"was not found after pulling {reference}", {"image": reference})
    on_line(f"pulled {reference}")
    return image


def list_images(client: docker.DockerClient) -> list[t.ImageInfo]:
    """Every tag of every image that carries the `cellbox.image` label, newest first, as it
    was given (Podman qualifies short names: `docker.io/library/x:1`, `localhost/x:1`)."""
    found: list[t.ImageInfo] = []
    for image in client.images.list(filters={"label": IMAGE_LABEL}):
        variant = image.labels.get(LABEL_VARIANT)
        created_at = _utc_iso(image.attrs["Created"])
        found.extend(
            t.ImageInfo(_short(tag), image.id, created_at, variant if variant in _VARIANTS else None)
            for tag in image.tags
        )
    found.sort(key=lambda info: (info.created_at, info.tag), reverse=True)
    return found


async def build_image(
    client: docker.DockerClient, params: t.BuildImageParams, *, on_line: Callable[[str], None]
) -> t.BuildImageResult:
    """Builds the image `params` describe unless an identical one has that tag already.

    The dependencies are parsed first (InvalidParams, InvalidDependencies), then the build runs
    in a thread of its own, each line of its output passed to `on_line` in the event loop's
    thread. A daemon thread, not the loop's executor: a daemon that stops must not wait for a
    build. Cancelling stops forwarding the output and drops the connection at the next line,
    which makes the engine abandon the build.
    """
    variant, deps = _dependencies(params)
    tag = params.tag or default_tag(variant, deps)
    if not _REFERENCE.fullmatch(tag) or len(tag) > _REFERENCE_MAX:
        raise errors.InvalidParams(
            f"Invalid params: tag {tag!r} is not an image name Docker takes (lowercase name[:tag])"
        )
    loop = asyncio.get_running_loop()
    done: asyncio.Future[t.BuildImageResult] = loop.create_future()
    stop = threading.Event()

    def call_soon(callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(callback, *args)

    def settle(outcome: t.BuildImageResult | BaseException) -> None:
        if done.done():  # cancelled
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    def work() -> None:
        outcome: t.BuildImageResult | BaseException
        try:
            emit = lambda line: call_soon(on_line, line)  # noqa: E731
            outcome = _Build(client, params, variant, deps, tag, emit).run(emit, stop)
        except docker.errors.APIError as exc:
            outcome = errors.BuildFailed(
                f"the Docker engine refused the build of {tag}: {exc.explanation or exc}", {"log": ""}
            )
        except OSError as exc:  # requests' other errors (no connection...) are OSErrors too
            outcome = errors.BackendUnavailable(
                f"the Docker engine failed during the build of {tag}: {exc}", {"backend": "docker"}
            )
        except BaseException as exc:
            outcome = exc
        call_soon(settle, outcome)

    threading.Thread(target=work, name=f"cellbox-build {tag}", daemon=True).start()
    try:
        return await done
    finally:
        stop.set()


def _dependencies(params: t.BuildImageParams) -> tuple[str | None, Dependencies]:
    if params.variant is not None and params.dependencies is not None:
        raise errors.InvalidParams("Invalid params: give either variant or dependencies, not both")
    if params.dependencies is None:
        variant = params.variant or "minimal"
        return variant, variant_dependencies(variant)
    deps = parse_dependencies(params.dependencies)
    for requirement in deps.requirements:
        if _LOCAL_FILE.search(requirement):
            raise errors.InvalidDependencies(
                f"{requirement!r}: a path on this machine is not visible to the image build; "
                "install it at runtime or give a url or git dependency",
                {"line": requirement},
            )
    return None, deps


def _image_user(root: bool) -> tuple[int, int] | None:
    """The UID/GID of the image's user, or None when the image keeps root."""
    if root:
        return None
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        # The daemon runs as root (in a container, under sudo): the host's UID would make the
        # image's user root again. 1000:1000 is the first regular user of most Linux systems.
        return FALLBACK_UID, FALLBACK_UID
    return uid, gid


def render_dockerfile(
    base_image: str,
    *,
    user: tuple[int, int] | None,
    path: str = _DEFAULT_PATH,
    ca_bundle: bool = False,
    requirements: bool = False,
) -> str:
    """The Dockerfile of an image; `ca_bundle` and `requirements` say which files the context has.

    The layers go from the least to the most often changed, so that Docker's layer cache keeps
    the user and the venv with ipykernel across builds that differ in their requirements only.
    The requirements are read from a file of the build context, never put into a shell line.
    Installs run as the image's user, so that the venv is theirs (runtime installs go into it)
    without a `chown -R` layer that would copy every file.
    """
    certs = f"PIP_CERT={CA_BUNDLE} SSL_CERT_FILE={CA_BUNDLE} REQUESTS_CA_BUNDLE={CA_BUNDLE}"
    lines = [
        f"FROM {base_image}",
        "USER root",
        f"ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 HOME={HOME}",
        *([f"COPY ca-bundle.crt {CA_BUNDLE}", f"ENV {certs}"] if ca_bundle else []),
        # no way up from the image's user: no binary that runs with another user's rights
        "RUN find / -xdev -type f -perm /6000 -exec chmod a-s {} + 2>/dev/null || true",
        "COPY cellbox-packages.pth /opt/cellbox/cellbox-packages.pth",
    ]
    dirs = f"/opt/cellbox {PACKAGES} {WORKSPACE} {WORKSPACE}/skills {WORKSPACE}/images"
    if user is None:
        lines.append(f"RUN mkdir -p {dirs} {HOME}")
    else:
        uid, gid = user
        lines += [
            f"RUN groupadd --non-unique --gid {gid} {USER_NAME} \\\n"
            f" && useradd --non-unique --no-log-init --uid {uid} --gid {gid} --create-home"
            f" --home-dir {HOME} {USER_NAME} \\\n"
            f" && mkdir -p {dirs} \\\n"
            f" && chown {uid}:{gid} {dirs}",
            f"USER {uid}:{gid}",
        ]
    lines += [
        f"RUN python3 -m venv {VENV} \\\n && {VENV}/bin/{_PIP_INSTALL} {shlex.quote(IPYKERNEL)} \\\n"
        # the prefix's site dir is there from the start: Python never looks again in a folder of
        # sys.path that was missing when it started
        f" && {PYTHON} -c 'import os, shutil, sys, sysconfig; "
        f'shutil.copy("/opt/cellbox/cellbox-packages.pth", sysconfig.get_paths()["purelib"]); '
        f'os.makedirs("{PACKAGES}/lib/python%d.%d/site-packages" % sys.version_info[:2])\'',
        f"ENV PATH={PACKAGES}/bin:{VENV}/bin:{path} VIRTUAL_ENV={VENV} PYTHONPATH={WORKSPACE}/skills",
    ]
    if requirements:
        lines += [
            "COPY requirements.txt /opt/cellbox/requirements.txt",
            f"RUN {_PIP_INSTALL} -r /opt/cellbox/requirements.txt",
        ]
    lines.append(f"WORKDIR {WORKSPACE}")
    return "\n".join(lines) + "\n"


class _Build:
    """One build, run in a worker thread: what to build, then the engine's work."""

    def __init__(
        self,
        client: docker.DockerClient,
        params: t.BuildImageParams,
        variant: str | None,
        deps: Dependencies,
        tag: str,
        on_line: Callable[[str], None],
    ) -> None:
        self.client = client
        self.deps = deps
        self.tag = tag
        self.base = params.base_image or os.environ.get("CELLBOX_BASE_IMAGE") or DEFAULT_BASE_IMAGE
        self.log: list[str] = []
        base = find_image(client, self.base)
        if base is None:
            try:
                base = pull(client, self.base, on_line)
            except errors.ImageNotFound as exc:
                raise errors.BuildFailed(
                    f"the base image {self.base!r} is not on the Docker engine and {exc.message}; "
                    "choose another with --base-image / baseImage / $CELLBOX_BASE_IMAGE",
                    {"log": ""},
                ) from None
        self.base_id: str = base.id
        self.files: dict[str, bytes] = {"cellbox-packages.pth": _PACKAGES_PTH.encode()}
        ca_path = os.environ.get("CELLBOX_CA_BUNDLE")
        if ca_path:
            try:
                with open(ca_path, "rb") as f:
                    self.files["ca-bundle.crt"] = f.read()
            except OSError as exc:
                raise errors.BuildFailed(
                    f"cannot read the CA bundle $CELLBOX_CA_BUNDLE names ({ca_path}): {exc.strerror}",
                    {"log": ""},
                ) from None
        if deps.requirements:
            self.files["requirements.txt"] = "".join(f"{r}\n" for r in deps.requirements).encode()
        user = _image_user(params.root)
        env_path = next((e[5:] for e in base.attrs["Config"].get("Env") or () if e.startswith("PATH=")), "")
        self.files["Dockerfile"] = render_dockerfile(
            self.base,
            user=user,
            path=env_path or _DEFAULT_PATH,
            ca_bundle="ca-bundle.crt" in self.files,
            requirements="requirements.txt" in self.files,
        ).encode()
        uid, gid = user or (0, 0)
        shaping = {
            "requirements": requirements_hash(deps),
            "base": self.base_id,
            "root": params.root,
            "uid": uid,
            "gid": gid,
            "ca": hashlib.sha256(self.files.get("ca-bundle.crt", b"")).hexdigest(),
            "version": __version__,
            "dockerfile": self.files["Dockerfile"].decode(),
        }
        self.hash = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
        self.labels = {
            IMAGE_LABEL: "1",
            LABEL_VERSION: __version__,
            LABEL_HASH: self.hash,
            LABEL_UID: str(uid),
            LABEL_GID: str(gid),
            LABEL_USER: "root" if user is None else USER_NAME,
            **({LABEL_VARIANT: variant} if variant is not None else {}),
        }

    def run(self, on_line: Callable[[str], None], stop: threading.Event) -> t.BuildImageResult:
        previous = find_image(self.client, self.tag)
        if previous is not None and previous.labels.get(LABEL_HASH) == self.hash:
            return t.BuildImageResult(self.tag, previous.id, built=False)

        def emit(line: str) -> None:
            self.log.append(line)
            on_line(line)

        if self.deps.python is not None:
            self._check_python(emit)
        error = self._stream(emit, stop)
        if stop.is_set():
            raise errors.RequestCancelled(f"the build of {self.tag} was cancelled")
        if error is not None:
            last = next((line.strip() for line in reversed(self.log) if not _BUILDER_LINE.match(line)), "")
            emit(f"ERROR: {error}")
            detail = f"; last output: {last}" if last else ""
            raise errors.BuildFailed(f"building {self.tag} failed: {error}{detail}", {"log": self.text})
        image = self.client.images.get(self.tag)
        if previous is not None and previous.id != image.id:
            self._remove_if_unused(previous.id)
        return t.BuildImageResult(self.tag, image.id, built=True)

    def _remove_if_unused(self, image_id: str) -> None:
        """Removes the cellbox image the tag named before, unless it has other tags or users."""
        image = find_image(self.client, image_id)
        if image is not None and not image.tags and image.labels.get(IMAGE_LABEL):
            with contextlib.suppress(docker.errors.APIError):  # a container still uses it
                self.client.images.remove(image_id)

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.log)

    def _check_python(self, emit: Callable[[str], None]) -> None:
        """Compares the base image's Python with the `python` constraint, before anything is built."""
        assert self.deps.python is not None
        probe = "import platform; print(platform.python_version())"
        try:
            output = self.client.containers.run(
                self.base_id,
                entrypoint=["python3", "-c", probe],
                user="0",
                network_disabled=True,
                remove=True,
            )
            version = Version.parse(output.decode().strip())
        except (docker.errors.ContainerError, docker.errors.APIError, ValueError) as exc:
            raise errors.BuildFailed(
                f"cannot learn the Python version of {self.base!r} (`python3 -c` failed): {exc}", {"log": ""}
            ) from None
        if not parse_constraint(self.deps.python).allows(version):
            raise errors.BuildFailed(
                f"the dependencies need Python {self.deps.python}, but {self.base!r} has Python {version}",
                {"log": self.text},
            )
        emit(f"Python {version} of {self.base} satisfies python = {self.deps.python!r}")

    def _stream(self, emit: Callable[[str], None], stop: threading.Event) -> str | None:
        """Runs the build; emits its output line by line; the engine's error, if any."""
        stream = self.client.api.build(
            fileobj=io.BytesIO(self._context()),
            custom_context=True,
            tag=self.tag,
            labels=self.labels,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
        )
        partial = ""
        try:
            for item in stream:
                if stop.is_set():
                    return None
                text = item.get("stream") or item.get("status")
                if isinstance(text, str):
                    *lines, partial = (partial + text).split("\n")
                    for line in lines:
                        emit(_ANSI.sub("", line))
                if "error" in item or "errorDetail" in item:
                    detail = item.get("errorDetail") or {}
                    return str(item.get("error") or detail.get("message") or item)
        except docker.errors.APIError as exc:
            return str(exc.explanation or exc)
        finally:
            # closing the stream drops the connection, which stops a build still running
            stream.close()
            if partial:
                emit(_ANSI.sub("", partial))
        return None

    def _context(self) -> bytes:
        """The build context as a tar; fixed metadata, so that COPY steps hit the cache."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, content in sorted(self.files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()


def _short(tag: str) -> str:
    for prefix in ("docker.io/library/", "localhost/"):
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return tag


_CREATED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def _utc_iso(created: str) -> str:
    """An engine's RFC 3339 time (nanoseconds, any offset) as ISO 8601 UTC with milliseconds."""
    match = _CREATED.match(created)
    if match is None:
        return created
    seconds, fraction, offset = match.groups()
    parsed = datetime.datetime.fromisoformat(
        f"{seconds}.{(fraction or '0')[:6].ljust(6, '0')}{'+00:00' if offset == 'Z' else offset}"
    )
    return parsed.astimezone(datetime.UTC).isoformat(timespec="milliseconds")
