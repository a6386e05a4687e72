"""The transport and the LSP lifecycle, byte by byte: framing, envelopes, errors, progress."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import new_kernel
from tests.rpc import Daemon

NO_ENGINE = "unix:///nonexistent/docker.sock"


def engine_reachable() -> bool:
    import docker

    try:
        return bool(docker.from_env(timeout=2).ping())
    except Exception:
        return False


def bubblewrap_works() -> bool:
    from cellboxd.backends import bubblewrap

    return bubblewrap._problem() is None


def test_initialize_advertises_cellbox(daemon: Daemon) -> None:
    result = daemon.init_result
    assert result["serverInfo"]["name"] == "cellbox"
    assert result["serverInfo"]["version"]
    cellbox = result["capabilities"]["experimental"]["cellbox"]
    backends = ["local", "docker"] if engine_reachable() else ["local"]
    backends += ["bubblewrap"] if bubblewrap_works() else []
    assert cellbox == {
        "protocolVersion": 1,
        "backends": backends,
        "defaultBackend": "local",
        "fileCap": 8 << 20,
    }


def test_no_engine_means_no_docker_backend_and_a_clear_error() -> None:
    with Daemon(env={"DOCKER_HOST": NO_ENGINE}) as d:
        backends = ["local", "bubblewrap"] if bubblewrap_works() else ["local"]
        assert d.init_result["capabilities"]["experimental"]["cellbox"]["backends"] == backends
        for method, params in (
            ("cellbox/createSandbox", {"backend": "docker"}),
            ("cellbox/buildImage", {"variant": "minimal"}),
            ("cellbox/listImages", {}),
        ):
            error = d.response(d.start(method, params))["error"]
            assert error["code"] == 1003, error
            assert NO_ENGINE in error["message"] and "DOCKER_HOST" in error["message"]
        # the local backend keeps working
        assert d.request("cellbox/createSandbox", {"backend": "local"})["backend"] == "local"


def test_requests_before_initialize_are_refused() -> None:
    with Daemon(initialize=False) as d:
        response = d.response(d.start("cellbox/listSandboxes", {}))
        assert response["error"]["code"] == -32002
        d.request("initialize", {"processId": None, "capabilities": {}})
        assert d.request("cellbox/listSandboxes", {}) == {"sandboxes": []}


def test_initialization_options_are_validated_and_applied() -> None:
    with Daemon(initialize=False) as d:
        bad = d.response(
            d.start("initialize", {"capabilities": {}, "initializationOptions": {"logLevel": 3}})
        )
        assert bad["error"]["code"] == -32602 and "logLevel" in bad["error"]["message"]
    with Daemon(initialize=False, env={"DOCKER_HOST": NO_ENGINE}) as d:
        result = d.request(
            "initialize", {"capabilities": {}, "initializationOptions": {"defaultBackend": "docker"}}
        )
        assert result["capabilities"]["experimental"]["cellbox"]["defaultBackend"] == "docker"
        error = d.response(d.start("cellbox/createSandbox", {}))["error"]
        assert error["code"] == 1003 and "'local'" in error["message"]


def test_shutdown_then_exit_ends_the_process_with_0(daemon: Daemon) -> None:
    assert daemon.request("shutdown") is None
    after = daemon.response(daemon.start("cellbox/listSandboxes", {}))
    assert after["error"]["code"] == -32600
    daemon.notify("exit")
    assert daemon.proc.wait(timeout=10) == 0


def test_exit_without_shutdown_ends_the_process_with_1(daemon: Daemon) -> None:
    daemon.notify("exit")
    assert daemon.proc.wait(timeout=10) == 1


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", -32700),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "x"', -32700),
        (b"\xff\xfe\x00garbage", -32700),
        (b"[1, 2]", -32600),
        (b"42", -32600),
        (b'{"jsonrpc": "1.0", "id": 7, "method": "cellbox/listSandboxes"}', -32600),
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "cellbox/listSandboxes"}', -32600),
        (b'{"jsonrpc": "2.0", "id": 8, "method": 5}', -32600),
        (b'{"jsonrpc": "2.0", "id": 9}', -32600),
        (b'{"jsonrpc": "2.0", "id": 10, "method": "cellbox/listSandboxes", "params": 3}', -32602),
        (b'{"jsonrpc": "2.0", "id": 11, "method": "cellbox/noSuchMethod", "params": {}}', -32601),
        (b'{"jsonrpc": "2.0", "id": 12, "method": "initialize", "params": {"capabilities": {}}}', -32600),
        (b'{"jsonrpc": "2.0", "id": 13, "method": "textDocument/hover", "params": {"x": 1}}', -32602),
    ],
)
def test_malformed_messages_get_the_right_error_and_the_daemon_goes_on(
    shared_daemon: Daemon, raw: bytes, code: int
) -> None:
    d = shared_daemon
    d.send_bytes(b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
    try:
        expected_id = json.loads(raw).get("id")
    except (ValueError, AttributeError):
        expected_id = 1 if raw.startswith(b'{"jsonrpc": "2.0", "id": 1,') else None  # read all the same
    if code == -32600 and not isinstance(expected_id, int):
        expected_id = None
    response = d.response(expected_id, timeout=10)
    assert response["error"]["code"] == code, response
    assert d.request("cellbox/listSandboxes", {}) is not None


@pytest.mark.parametrize(
    "frame",
    [
        b"Content-Length: abc\r\n\r\n",
        b"Content-Length: -5\r\n\r\n",
        b"this is not a header\r\n\r\n",
        b"X" * 100_000 + b"\r\n\r\n",
        b"Content-Length: 999999999999\r\n\r\n",
    ],
)
def test_bad_frames_get_a_parse_error_and_the_daemon_resyncs(daemon: Daemon, frame: bytes) -> None:
    daemon.send_bytes(frame)
    if b"999999999999" not in frame:
        assert daemon.response(None, timeout=10)["error"]["code"] == -32700
        assert daemon.request("cellbox/listSandboxes", {}) == {"sandboxes": []}
    else:
        # a frame that long is refused and skipped: the daemon can only wait for its bytes
        assert daemon.response(None, timeout=10)["error"]["code"] == -32700
        assert daemon.proc.stdin is not None
        daemon.proc.stdin.close()
        assert daemon.proc.wait(timeout=10) == 1


def _request(msg_id: int | str, method: str = "cellbox/listSandboxes", params: object = None) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}}).encode()


def _frame(body: bytes, length: int | None = None) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "expected_id"),
    [
        (b'{"jsonrpc": "2.0", "id": 21, "method": "cellbox/listSandboxes", "params": {"x": "\xff\xfe"}}', 21),
        (b'{"jsonrpc": "2.0", "id": "deep", "method": "m", "params": {"x": ' + DEEP + b"}}", "deep"),
        (b'{"jsonrpc": "2.0", "params": {"x": ' + DEEP + b'}, "method": "m", "id": 22}', 22),
        # an `id` inside the params is not the request's
        (b'{"params": {"id": 23, "x": "\xff"}, "jsonrpc": "2.0", "method": "m"}', None),
        (b'{"id": {"no": 1}, "x": "\xc3"}', None),
        (DEEP, None),
    ],
)
def test_bodies_not_utf8_or_nested_too_deeply_get_a_parse_error_with_their_id(
    shared_daemon: Daemon, body: bytes, expected_id: int | str | None
) -> None:
    d = shared_daemon
    d.send_bytes(_frame(body))
    assert d.response(expected_id, timeout=10)["error"]["code"] == -32700
    assert d.request("cellbox/listSandboxes", {}) is not None


def test_a_frame_shorter_than_its_length_loses_nothing_after_it(shared_daemon: Daemon) -> None:
    d = shared_daemon
    for short_by in (1, 3, 14, 15, 19, 22):
        first, second, third = (f"short{short_by}-{i}" for i in range(3))
        body = _request(first)
        # the first body takes the next header's first bytes, or all of it
        d.send_bytes(_frame(body, len(body) + short_by) + _frame(_request(second)) + _frame(_request(third)))
        for msg_id in (first, second, third):
            assert "result" in d.response(msg_id, timeout=10), (short_by, msg_id)


def test_a_frame_longer_than_its_length_is_refused_and_the_next_header_found(shared_daemon: Daemon) -> None:
    d = shared_daemon
    for long_by in (1, 3, 40):
        first, second, third = (f"long{long_by}-{i}" for i in range(3))
        body = _request(first)
        # what is left of the first body is glued to the next header, on one line
        d.send_bytes(_frame(body, len(body) - long_by) + _frame(_request(second)) + _frame(_request(third)))
        assert d.response(first, timeout=10)["error"]["code"] == -32700
        assert d.response(None, timeout=10)["error"]["code"] == -32700  # the remnant
        for msg_id in (second, third):
            assert "result" in d.response(msg_id, timeout=10), (long_by, msg_id)


def test_a_header_inside_a_string_or_after_a_long_remnant_is_found_right(shared_daemon: Daemon) -> None:
    d = shared_daemon
    code = "print('time: 5 Content-Length: 5')" + "#" * 40_000
    # not UTF-8, with a header's text in a string: answered with its id, nothing after it lost
    bad = b'{"jsonrpc": "2.0", "id": "in-string", "method": "m", "params": {"x": "Content-Length: 5 \xff"}}'
    d.send_bytes(_frame(bad) + _frame(_request("after-string")))
    assert d.response("in-string", timeout=10)["error"]["code"] == -32700
    assert "result" in d.response("after-string", timeout=10)
    for cut in (20, 45, 100):  # remnants that look like a header, hold one in a string, are long
        body = _request(f"remnant-{cut}", "cellbox/execute", {"kernelId": "k-none", "code": code})
        d.send_bytes(_frame(body, cut) + _frame(_request(f"after-{cut}")))
        assert "result" in d.response(f"after-{cut}", timeout=10), cut


def test_extra_headers_and_unknown_notifications_are_fine(shared_daemon: Daemon) -> None:
    d = shared_daemon
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "str-id", "method": "cellbox/listSandboxes", "params": {}}
    ).encode()
    d.send_bytes(
        b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    assert "result" in d.response("str-id")
    d.notify("cellbox/noSuchNotification", {"a": 1})
    d.notify("$/cancelRequest", {"id": 123456})  # unknown id: ignored
    d.send({"jsonrpc": "2.0", "id": 987654, "result": None})  # a response nobody asked for
    assert d.request("cellbox/listSandboxes", {}) is not None


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("cellbox/execute", {"kernelId": 5, "code": "1"}, "$.kernelId"),
        ("cellbox/execute", {"kernelId": "k", "code": "1", "timeout": -1}, "$.timeout"),
        ("cellbox/execute", {"code": "1"}, "kernelId"),
        ("cellbox/createSandbox", {"backend": "vm"}, "$.backend"),
        ("cellbox/createSandbox", {"env": {"A": 1}}, "$.env"),
        ("cellbox/createSandbox", {"limits": {"memoryMb": "lots"}}, "$.limits.memoryMb"),
        ("cellbox/installPackage", {"sandboxId": "s", "packages": []}, "$.packages"),
        ("cellbox/getSkillSources", {"sandboxId": "s", "modules": ["not a module"]}, "$.modules[0]"),
        ("cellbox/startKernel", [], "array"),
    ],
)
def test_invalid_params_name_the_field(
    shared_daemon: Daemon, method: str, params: object, field: str
) -> None:
    error = shared_daemon.response(shared_daemon.start(method, params))["error"]
    assert error["code"] == -32602
    assert field in error["message"] and method in error["message"]


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("cellbox/startKernel", {"sandboxId": "sb-nope"}, 1001),
        ("cellbox/destroySandbox", {"sandboxId": "sb-nope"}, 1001),
        ("cellbox/installPackage", {"sandboxId": "sb-nope", "packages": ["x"]}, 1001),
        ("cellbox/getSkillSources", {"sandboxId": "sb-nope", "modules": ["x"]}, 1001),
        ("cellbox/execute", {"kernelId": "k-nope", "code": "1"}, 1002),
        ("cellbox/interruptKernel", {"kernelId": "k-nope"}, 1002),
        ("cellbox/restartKernel", {"kernelId": "k-nope"}, 1002),
        ("cellbox/shutdownKernel", {"kernelId": "k-nope"}, 1002),
    ],
)
def test_unknown_ids_answer_application_errors(
    shared_daemon: Daemon, method: str, params: object, code: int
) -> None:
    error = shared_daemon.response(shared_daemon.start(method, params))["error"]
    assert error["code"] == code, error
    assert error["message"]


def test_local_backend_refuses_docker_only_options(shared_daemon: Daemon) -> None:
    error = shared_daemon.response(shared_daemon.start("cellbox/createSandbox", {"network": "none"}))["error"]
    assert error["code"] == -32602 and "docker" in error["message"]


def test_create_sandbox_reports_work_done_progress(shared_daemon: Daemon) -> None:
    d = shared_daemon
    result = d.request("cellbox/createSandbox", {"workDoneToken": "tok-create", "name": "named"})
    kinds = [p["value"]["kind"] for p in d.notes("$/progress") if p["token"] == "tok-create"]
    assert kinds[0] == "begin" and kinds[-1] == "end"
    listed = {s["sandboxId"]: s for s in d.request("cellbox/listSandboxes", {})["sandboxes"]}
    info = listed[result["sandboxId"]]
    assert info["name"] == "named" and info["backend"] == "local" and info["kernels"] == []
    assert info["createdAt"].endswith("+00:00")


def test_log_messages_reach_the_client(shared_daemon: Daemon) -> None:
    shared_daemon.request("cellbox/createSandbox", {})
    messages = [n["message"] for n in shared_daemon.notes("window/logMessage")]
    assert any("created" in m for m in messages)


# -- fuzz -----------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_methods = st.sampled_from(
    [
        "cellbox/execute",
        "cellbox/createSandbox",
        "cellbox/startKernel",
        "cellbox/installPackage",
        "cellbox/getSkillSources",
        "cellbox/destroySandbox",
        "cellbox/listSandboxes",
        "cellbox/restartKernel",
        "initialize",
        "shutdown",
        "textDocument/completion",
        "$/cancelRequest",
        "nope",
    ]
)
_messages = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda method, params, msg_id: json.dumps(
            {
                "jsonrpc": "2.0",
                "method": method,
                "params": params,
                **({"id": msg_id} if msg_id is not None else {}),
            }
        ).encode(),
        _methods,
        _json_values,
        # ids that cannot collide with the test's own (positive integers)
        st.none() | st.integers(max_value=-1) | st.text(max_size=5).map(lambda s: "fuzz" + s),
    ),
    st.builds(lambda v: json.dumps(v).encode(), _json_values),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bodies=st.lists(_messages, min_size=1, max_size=5), framing=st.sampled_from(["good", "bad-length", "raw"])
)
def test_fuzzed_input_never_stops_the_daemon(
    shared_daemon: Daemon, bodies: list[bytes], framing: str
) -> None:
    d = shared_daemon
    for body in bodies:
        if b"shutdown" in body or b'"exit"' in body:
            continue  # these end the daemon on purpose
        if framing == "good":
            d.send_bytes(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif framing == "bad-length":
            d.send_bytes(b"Content-Length: %d\r\n\r\n" % (len(body) + 1) + body + b" ")
        else:
            d.send_bytes(body + b"\r\n\r\n")
    # whatever came before, a well-framed request gets its answer
    marker = f"alive-{os.urandom(4).hex()}"
    d.send({"jsonrpc": "2.0", "id": marker, "method": "cellbox/listSandboxes", "params": {}})
    assert "result" in d.response(marker, timeout=20)
    assert d.proc.poll() is None


def test_fuzz_left_kernels_alone(shared_daemon: Daemon) -> None:
    _, kernel = new_kernel(shared_daemon)
    assert shared_daemon.request("cellbox/execute", {"kernelId": kernel, "code": "6 * 7"})["text"] == "42\n"


def _malformed(rng: random.Random, n: int) -> tuple[bytes, tuple[str, int] | None]:
    """One malformed message of a kind chosen by `rng`, and the (id, code) of its answer when
    it has one the test can know."""
    msg_id = f"bad-{n}"
    kind = rng.randrange(16)
    if kind == 0:  # invalid UTF-8 inside a string
        return _frame(
            b'{"jsonrpc": "2.0", "id": "%s", "method": "m", "params": {"x": "\xc3\x28"}}' % msg_id.encode()
        ), (msg_id, -32700)
    if kind == 1:  # nested too deeply for any decoder
        depth = rng.choice((1_000, 5_000, 30_000))
        deep = b"[" * depth + b"]" * depth
        return _frame(
            b'{"jsonrpc": "2.0", "id": "%s", "method": "m", "params": {"x": %s}}' % (msg_id.encode(), deep)
        ), (msg_id, -32700)
    if kind == 2:  # cut short: not JSON
        body = _request(msg_id)
        return _frame(body[: rng.randrange(len(body) // 2, len(body) - 1)]), (msg_id, -32700)
    if kind == 3:  # not an object
        return _frame(rng.choice((b"[1, 2]", b"42", b'"text"', b"null", b"[]"))), None
    if kind == 4:
        return _frame(json.dumps({"jsonrpc": "1.0", "id": msg_id, "method": "m"}).encode()), (msg_id, -32600)
    if kind == 5:
        return _frame(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": 5}).encode()), (msg_id, -32600)
    if kind == 6:
        return _frame(
            json.dumps(
                {"jsonrpc": "2.0", "id": msg_id, "method": "cellbox/listSandboxes", "params": 3}
            ).encode()
        ), (msg_id, -32602)
    if kind == 7:
        return _frame(_request(msg_id, f"cellbox/no{n}")), (msg_id, -32601)
    if kind == 8:  # params that do not validate
        params = rng.choice(
            (
                {},
                {"kernelId": 5},
                {"kernelId": "k", "code": None},
                {"kernelId": "k", "code": "1", "timeout": "x"},
            )
        )
        return _frame(_request(msg_id, "cellbox/execute", params)), (msg_id, -32602)
    if kind == 9:  # framed random bytes
        return _frame(rng.randbytes(rng.randrange(1, 300)).replace(b"ontent", b"")), None
    if kind == 10:  # lines that are no headers
        return rng.randbytes(rng.randrange(1, 200)).replace(b"ontent", b"") + b"\r\n\r\n", None
    if kind == 11:
        return rng.choice(
            (b"Content-Length: abc\r\n\r\n", b"Content-Length: -5\r\n\r\n", b"X" * 20_000 + b"\r\n\r\n")
        ), None
    if kind == 12:  # shorter than its length: the request is served all the same
        body = _request(msg_id, "cellbox/no-such")
        # the bytes it lacks are taken from the next frame, whose header is then found again
        filler = _frame(json.dumps({"jsonrpc": "2.0", "method": "$/fuzz", "params": {}}).encode())
        return _frame(body, len(body) + rng.randrange(1, 23)) + filler, (msg_id, -32601)
    if kind == 13:  # longer than its length
        body = _request(msg_id)
        return _frame(body, len(body) - rng.randrange(1, 30)), (msg_id, -32700)
    if kind == 14:  # unknown notification: no answer
        return _frame(json.dumps({"jsonrpc": "2.0", "method": f"$/fuzz{n}", "params": {}}).encode()), None
    # a malformed id
    return _frame(json.dumps({"jsonrpc": "2.0", "id": {"n": n}, "method": "m"}).encode()), None


def test_ten_thousand_malformed_messages_among_executes_answered_exactly(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    rng = random.Random(20261201)
    expected: dict[str, int] = {}
    executes: dict[str, str] = {}
    stream = bytearray()
    for n in range(10_000):
        data, answer = _malformed(rng, n)
        stream += data
        if answer is not None:
            expected[answer[0]] = answer[1]
        if n % 50 == 49:
            ex = f"ex-{n}"
            executes[ex] = f"{n * 7}\n"
            stream += _frame(_request(ex, "cellbox/execute", {"kernelId": kernel, "code": f"{n} * 7"}))
    d.send_bytes(bytes(stream))
    for ex, text in executes.items():
        result = d.response(ex, timeout=60)["result"]
        assert (result["status"], result["text"]) == ("ok", text), ex
    for msg_id, code in expected.items():
        assert d.response(msg_id, timeout=30)["error"]["code"] == code, msg_id
    assert d.request("cellbox/listSandboxes", {}) is not None
