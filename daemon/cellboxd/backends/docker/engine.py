"""The Docker engine the daemon talks to, wherever it runs, and the exec sessions to sandboxes.

The engine is the one `DOCKER_HOST` names (`unix://`, `tcp://` with or without TLS, `ssh://`),
as the docker CLI and SDK read it: Docker Engine, Docker Desktop (whose engine runs in a VM),
Podman's Docker-compatible API, a remote machine. Nothing here assumes the engine shares the
daemon's file system or network: the daemon and a sandbox meet through the engine's API, in
one exec session per sandbox that starts the agent and carries its channel (`exec_link`; on an
engine of this machine the channel may move to a socket of the daemon's, channel_socket.py).

The docker SDK (loaded when the engine is first used, not when the daemon starts) makes the
calls; the exec session's stream is the daemon's own asyncio connection to the engine, so that
it costs no thread and reads as fast as the socket does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cellbox import errors
from cellboxd import channel as ch

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"
_STREAM_HEAD = 8  # Docker's stream framing: stream type, 3 zero bytes, 4-byte big-endian size


def host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


if not host().startswith("ssh://"):
    # The SDK imports paramiko, where it is installed, for an ssh transport of its own that only
    # an ssh:// engine uses: kept out, the first engine call comes 0.25 s and 20 MB cheaper.
    sys.modules.setdefault("paramiko", None)  # type: ignore[arg-type]  # None: "not importable"


def _tls() -> bool:
    """Whether the SDK talks TLS to a tcp:// engine (DOCKER_TLS_VERIFY or DOCKER_CERT_PATH)."""
    verify = os.environ.get("DOCKER_TLS_VERIFY", "")
    return bool(os.environ.get("DOCKER_CERT_PATH")) or (verify != "" and verify != "0")


def connect(timeout: float = 30) -> docker.DockerClient:
    """A client of the engine, or BackendUnavailable saying where it looked and how to fix it."""
    import docker

    where = os.environ.get("DOCKER_HOST") or f"the default socket ({DEFAULT_HOST})"
    try:
        # ssh:// through the ssh command (as the docker CLI does), not the paramiko extra
        client = docker.from_env(timeout=timeout, use_ssh_client=host().startswith("ssh://"))
        if not host().startswith("ssh://"):
            # one connection per request, closed when it is answered: the SDK keeps a pool per
            # URL (25 of them), so kept-alive connections would pile up with every container
            # and exec id; a unix socket costs microseconds to open, an engine call milliseconds
            client.api.headers["Connection"] = "close"
        client.ping()
    except Exception as exc:
        raise errors.BackendUnavailable(
            f"no Docker engine reachable at {where}: {exc}. Start Docker, or point DOCKER_HOST at a "
            "running engine, or use backend 'local'",
            {"backend": "docker"},
        ) from None
    return client


def reachable(timeout: float = 3.0) -> bool:
    """Whether an engine answers now (for `initialize`: a quick look, not a wait).

    An engine on a unix socket or plain TCP gets a `GET /_ping` of a few bytes, so that a
    daemon that never makes a docker sandbox never loads the SDK; others (TLS, ssh) the SDK's
    ping.
    """
    scheme, _, where = host().partition("://")
    if scheme == "unix" or (scheme == "tcp" and not _tls()):
        return _ping(scheme, where, timeout)
    try:
        connect(timeout).close()
    except errors.BackendUnavailable:
        return False
    return True


def on_this_machine(info: dict[str, Any]) -> bool:
    """Whether the engine runs on the daemon's machine and can mount the daemon's folders: it
    is reached on a unix socket, has this machine's host name (Docker Desktop's engine, in a
    VM, has its own) and runs as root or as the daemon's user (a rootless engine of another
    user cannot enter the daemon's runtime folder)."""
    url = host()
    if not url.startswith("unix://") or info.get("Name") != socket.gethostname():
        return False
    try:
        owner = os.stat(url.removeprefix("unix://")).st_uid
    except OSError:
        return False
    return owner in (0, os.getuid())


def _ping(scheme: str, where: str, timeout: float) -> bool:
    try:
        if scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(where)
        else:
            address, _, port = where.rstrip("/").rpartition(":")
            sock = socket.create_connection((address.strip("[]"), int(port)), timeout)
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status = sock.recv(64).split(b"\r\n", 1)[0]
    except (OSError, ValueError):
        return False
    return status.startswith(b"HTTP/") and status.split()[1:2] == [b"200"]


# --- exec sessions ---------------------------------------------------------------------------


class ExecFailed(Exception):
    """The engine would not start or attach the exec session."""


class _Stream:
    """The bytes of an exec session: the engine's HTTP answer, then its stream framing, whose
    stdout goes to the channel and stderr to the log; `ended` is told when it ends, and why."""

    def __init__(self, channel: ch.Channel, ended: Callable[[str], None]) -> None:
        self.channel = channel
        self._ended = ended
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = bytearray()
        self._buffer = bytearray()

    def received(self, data: bytes) -> None:
        if self.started.done() and (self.started.cancelled() or self.started.exception()):
            return  # the session failed to start: what follows is not the agent's
        if not self.started.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 1 << 16:
                    self.started.set_exception(ExecFailed("the engine's answer has no end of headers"))
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            status = head.split(b"\r\n", 1)[0].split()
            if len(status) < 2 or status[1] not in (b"101", b"200"):
                self.started.set_exception(ExecFailed(_http_error(status, rest)))
                return
            self._head.clear()
            self.started.set_result(None)
            data = rest
        self._demux(data)

    def _demux(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= _STREAM_HEAD:
            size = int.from_bytes(buffer[start + 4 : start + 8], "big")
            if end - start < _STREAM_HEAD + size:
                break
            payload = bytes(buffer[start + _STREAM_HEAD : start + _STREAM_HEAD + size])
            if buffer[start] == 1:
                self.channel.feed(payload)
            else:
                self.channel.complain(payload)
            start += _STREAM_HEAD + size
        if start:
            del buffer[:start]

    def ended(self, why: str) -> None:
        if not self.started.done():
            self.started.set_exception(ExecFailed(why))
        self._ended(why)


def _http_error(status: list[bytes], body: bytes) -> str:
    text = body.decode(errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        text = json.loads(text)["message"]
    return f"{b' '.join(status[1:]).decode(errors='replace')}: {text}"


class _SocketLink(ch.TransportLink, asyncio.Protocol):
    """An exec session over a socket to the engine (unix, tcp, tls)."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._stream.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.ended("the engine ended the agent's exec session" + (f": {exc}" if exc else ""))

    def _writing(self) -> asyncio.WriteTransport | None:
        return self._transport

    def _reading(self) -> asyncio.ReadTransport | None:
        return self._transport


class _SshLink(ch.ChildLink):
    """An exec session through `ssh HOST docker system dial-stdio`, as the docker CLI reaches an
    ssh:// engine."""

    def __init__(self, stream: _Stream) -> None:
        super().__init__()
        self._stream = stream

    def received(self, data: bytes) -> None:
        self._stream.received(data)

    def complained(self, data: bytes) -> None:
        log.debug("ssh: %s", data.decode(errors="replace").rstrip())

    def process_exited(self) -> None:
        self._stream.ended("the ssh connection to the engine ended")


def _ssh_command(where: str) -> list[str]:
    """`ssh://[user@]host[:port]` as the ssh command the docker CLI runs for it."""
    target = where.rstrip("/")
    argv = ["ssh", "-o", "BatchMode=yes"]
    head, sep, port = target.rpartition(":")
    if sep and port.isdigit():
        target = head
        argv += ["-p", port]
    return [*argv, "--", target, "docker", "system", "dial-stdio"]


async def _open(make: Callable[[], asyncio.BaseProtocol]) -> ch.Link:
    """A new connection to the engine with protocol `make()`."""
    loop = asyncio.get_running_loop()
    scheme, _, where = host().partition("://")
    if scheme == "unix":
        _, protocol = await loop.create_unix_connection(make, where)
    elif scheme == "tcp":
        address, _, port = where.rstrip("/").rpartition(":")
        context = _tls_context() if _tls() else None
        _, protocol = await loop.create_connection(
            make, address.strip("[]"), int(port), ssl=context, server_hostname=address if context else None
        )
    elif scheme == "ssh":
        _, protocol = await loop.subprocess_exec(make, *_ssh_command(where))
    else:
        raise ExecFailed(f"DOCKER_HOST {host()!r}: cellbox reaches engines over unix://, tcp:// and ssh://")
    assert isinstance(protocol, _SocketLink | _SshLink)
    return protocol


def _tls_context() -> ssl.SSLContext:
    """TLS as the docker CLI sets it up from DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem)."""
    folder = os.environ.get("DOCKER_CERT_PATH") or os.path.join(os.path.expanduser("~"), ".docker")
    verify = os.environ.get("DOCKER_TLS_VERIFY", "") not in ("", "0")
    context = ssl.create_default_context(cafile=os.path.join(folder, "ca.pem") if verify else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        context.load_cert_chain(cert, key)
    return context


async def exec_link(
    client: docker.DockerClient,
    container_id: str,
    argv: list[str],
    channel: ch.Channel,
    ended: Callable[[str], None],
) -> ch.Link:
    """Starts `argv` in the container, attached: a link whose stdout goes to `channel`; `ended`
    is told when the session ends, and why.

    The exec is created through the SDK; its start is the daemon's own HTTP request on a new
    connection, which the engine then hands over to the process's stdin and output.
    """
    import docker.errors

    try:
        exec_id = (
            await asyncio.to_thread(
                client.api.exec_create, container_id, argv, stdin=True, stdout=True, stderr=True
            )
        )["Id"]
    except docker.errors.APIError as exc:
        raise ExecFailed(str(exc.explanation or exc)) from None
    stream = _Stream(channel, ended)
    is_ssh = host().startswith("ssh://")
    try:
        link = await _open(lambda: _SshLink(stream) if is_ssh else _SocketLink(stream))
    except OSError as exc:
        raise ExecFailed(f"cannot connect to the engine at {host()}: {exc}") from None
    body = b'{"Detach":false,"Tty":false}'
    where = "docker" if not host().startswith("tcp://") else host()[6:].rstrip("/")
    link.write(
        b"POST /v%s/exec/%s/start HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: %d\r\n\r\n%s"
        % (client.api.api_version.encode(), exec_id.encode(), where.encode(), len(body), body)
    )
    try:
        await asyncio.wait_for(asyncio.shield(stream.started), ch.HELLO_TIMEOUT)
    except (ExecFailed, TimeoutError) as exc:
        link.close()
        raise ExecFailed(str(exc) or "the engine did not start the exec session in time") from None
    except BaseException:  # cancelled: the session goes with its caller
        link.close()
        raise
    return link
