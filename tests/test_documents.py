"""Documents bound to kernels: completion and hover from the live kernel, over the protocol."""

from __future__ import annotations

import time

from tests.conftest import new_kernel
from tests.rpc import Daemon

URI = "file:///tmp/cellbox-notebook.py"


def _open(d: Daemon, text: str, uri: str = URI) -> None:
    d.notify(
        "textDocument/didOpen",
        {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}},
    )


def _complete(d: Daemon, line: int, character: int, uri: str = URI) -> dict:
    return d.request(
        "textDocument/completion",
        {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}},
    )


def test_initialize_advertises_completion_and_hover(shared_daemon: Daemon) -> None:
    capabilities = shared_daemon.init_result["capabilities"]
    assert capabilities["completionProvider"]["triggerCharacters"] == ["."]
    assert capabilities["hoverProvider"] is True


def test_names_from_earlier_executions_complete(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    d.request(
        "cellbox/execute",
        {"kernelId": kernel, "code": "import collections\nmy_counter = collections.Counter('abca')"},
    )
    text = "my_counter = ...\nmy_co\nmy_counter.most"
    _open(d, text)
    assert _complete(d, 1, 5)["items"] == []  # not bound yet: empty, at once
    assert d.request("cellbox/bindDocument", {"uri": URI, "kernelId": kernel}) is None

    items = _complete(d, 1, 5)["items"]
    labels = [i["label"] for i in items]
    assert "my_counter" in labels
    edit = next(i for i in items if i["label"] == "my_counter")["textEdit"]
    assert edit == {"range": {"start": {"line": 1, "character": 0}, "end": {"line": 1, "character": 5}},
                    "newText": "my_counter"}  # fmt: skip

    members = {i["label"]: i for i in _complete(d, 2, 15)["items"]}
    assert members["most_common"]["textEdit"] == {
        "range": {"start": {"line": 2, "character": 11}, "end": {"line": 2, "character": 15}},
        "newText": "most_common",
    }

    # the document changes (incremental sync); completion follows the new text
    d.notify(
        "textDocument/didChange",
        {
            "textDocument": {"uri": URI, "version": 2},
            "contentChanges": [
                {
                    "range": {"start": {"line": 2, "character": 0}, "end": {"line": 2, "character": 15}},
                    "text": "colle",
                }
            ],
        },
    )
    assert "collections" in [i["label"] for i in _complete(d, 2, 5)["items"]]


def test_hover_shows_what_the_kernel_knows(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    d.request(
        "cellbox/execute",
        {"kernelId": kernel, "code": "def greet(name):\n    'Say hello to name.'\n    return name"},
    )
    uri = "file:///tmp/hover.py"
    _open(d, "greet('x')\nnot_defined_anywhere\n", uri)
    d.request("cellbox/bindDocument", {"uri": uri, "kernelId": kernel})
    hover = d.request(
        "textDocument/hover", {"textDocument": {"uri": uri}, "position": {"line": 0, "character": 2}}
    )
    assert "Say hello to name." in hover["contents"]["value"]
    assert "\x1b[" not in hover["contents"]["value"]
    nothing = d.request(
        "textDocument/hover", {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 4}}
    )
    assert nothing is None


def test_a_busy_kernel_answers_empty_quickly_and_unbinding_works(shared_daemon: Daemon) -> None:
    d = shared_daemon
    _, kernel = new_kernel(d)
    uri = "file:///tmp/busy.py"
    _open(d, "zz_value = 1\nzz_", uri)
    d.request("cellbox/bindDocument", {"uri": uri, "kernelId": kernel})
    busy = d.start(
        "cellbox/execute", {"kernelId": kernel, "code": "import time; time.sleep(5)\nzz_value = 1"}
    )
    time.sleep(0.5)
    started = time.monotonic()
    assert _complete(d, 1, 3, uri)["items"] == []
    assert time.monotonic() - started < 3
    assert d.response(busy)["result"]["status"] == "ok"
    assert "zz_value" in [i["label"] for i in _complete(d, 1, 3, uri)["items"]]
    d.request("cellbox/bindDocument", {"uri": uri, "kernelId": None})
    assert _complete(d, 1, 3, uri)["items"] == []


def test_binding_an_unknown_kernel_is_kernel_not_found(shared_daemon: Daemon) -> None:
    response = shared_daemon.response(
        shared_daemon.start("cellbox/bindDocument", {"uri": URI, "kernelId": "k-nope"})
    )
    assert response["error"]["code"] == 1002
