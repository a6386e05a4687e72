"""Files through the protocol, on both backends: writeFile, readFile, listFiles, deleteFile,
their path rules and cap, and the Python client's upload and download."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellbox import Client, FileNotFound, InvalidParams, Sandbox
from tests.rpc import Daemon

CAP = 4096  # the daemons here take and answer at most this many bytes of content per call


@pytest.fixture(scope="module", params=["local", "docker"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_engine")
    return str(request.param)


@pytest.fixture(scope="module")
def client(backend: str) -> Iterator[Client]:
    with Client(env={"CELLBOX_FILE_CAP": str(CAP)}, log_level="warning") as made:
        yield made


@pytest.fixture(scope="module")
def sandbox(client: Client, backend: str) -> Iterator[Sandbox]:
    with client.create_sandbox(backend) as made:  # type: ignore[arg-type]
        yield made


def test_write_read_append_and_mode(client: Client, sandbox: Sandbox) -> None:
    assert client.capabilities.file_cap == CAP
    assert sandbox.write_file("notes/today.txt", "hello") == 5  # its folder is made
    assert sandbox.write_file("notes/today.txt", b" world", append=True) == 11
    assert sandbox.read_file("notes/today.txt") == b"hello world"
    assert sandbox.read_file("notes/today.txt", offset=6) == b"world"
    assert sandbox.read_file("notes/today.txt", offset=2, length=3) == b"llo"
    sandbox.write_file("run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    with sandbox.start_kernel() as kernel:
        mode = "os.stat('run.sh').st_mode & 0o777 == 0o755"
        code = f"import os, subprocess\n{mode}, subprocess.getoutput('./run.sh')"
        result = kernel.execute(code)
    assert result.text == "(True, 'ran')\n", result


def test_the_cap_per_call(client: Client, sandbox: Sandbox) -> None:
    big = bytes(range(256)) * 40  # 10240 bytes: more than a call takes
    with pytest.raises(InvalidParams, match="in pieces with `append`"):
        client.request(
            "cellbox/writeFile",
            {"sandboxId": sandbox.sandbox_id, "path": "big.bin", "content": base64.b64encode(big).decode()},
        )
    assert sandbox.write_file("big.bin", big) == len(big)  # the client writes it in pieces
    first = client.request("cellbox/readFile", {"sandboxId": sandbox.sandbox_id, "path": "big.bin"})
    assert (len(first.content), first.size, first.eof) == (CAP, len(big), False)
    last = client.request(
        "cellbox/readFile", {"sandboxId": sandbox.sandbox_id, "path": "big.bin", "offset": 2 * CAP}
    )
    assert (last.content, last.eof) == (big[2 * CAP :], True)
    assert sandbox.read_file("big.bin") == big  # and reads it in pieces


def test_list_files(sandbox: Sandbox) -> None:
    sandbox.write_file("tree/a.txt", "a")
    sandbox.write_file("tree/sub/b.txt", "bb")
    with sandbox.start_kernel() as kernel:
        kernel.execute("import os; os.symlink('a.txt', 'tree/link')")
    top = sandbox.list_files("tree")
    assert [(e.path, e.kind, e.size) for e in top if e.kind != "dir"] == [
        ("tree/a.txt", "file", 1),
        ("tree/link", "symlink", 5),
    ]
    assert [e.path for e in top if e.kind == "dir"] == ["tree/sub"]
    every = sandbox.list_files("tree", recursive=True)
    assert [e.path for e in every] == ["tree/a.txt", "tree/link", "tree/sub", "tree/sub/b.txt"]
    modified = datetime.datetime.fromisoformat(every[0].modified_at)
    assert abs((datetime.datetime.now(datetime.UTC) - modified).total_seconds()) < 600
    assert {"skills", "images", "tree"} <= {e.path for e in sandbox.list_files()}
    with pytest.raises(InvalidParams, match="not a folder"):
        sandbox.list_files("tree/a.txt")


def test_delete_files(sandbox: Sandbox) -> None:
    sandbox.write_file("gone/x/y.txt", "y")
    sandbox.write_file("gone/z.txt", "z")
    sandbox.delete_file("gone/z.txt")
    with pytest.raises(InvalidParams, match="not empty"):
        sandbox.delete_file("gone")
    sandbox.delete_file("gone", recursive=True)
    with pytest.raises(FileNotFound) as missing:
        sandbox.read_file("gone/x/y.txt")
    assert missing.value.code == 1010 and missing.value.data == {"path": "gone/x/y.txt"}
    with pytest.raises(FileNotFound):
        sandbox.delete_file("gone")
    with pytest.raises(FileNotFound):
        sandbox.list_files("gone")


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "..", "../x", "a/../../x", "skills/../../x", "x\0y", ".", ""], ids=repr
)
def test_paths_that_leave_the_workspace_are_invalid_params(sandbox: Sandbox, path: str) -> None:
    with pytest.raises(InvalidParams, match="path"):
        sandbox.read_file(path)
    with pytest.raises(InvalidParams, match="path"):
        sandbox.write_file(path, "x")


def test_symlinks_are_followed_inside_the_workspace_only(sandbox: Sandbox) -> None:
    root = sandbox.sandbox_workspace
    with sandbox.start_kernel() as kernel:
        code = (
            "import os\nos.makedirs('inside', exist_ok=True)\n"
            "for name, target in [('to-inside', 'inside'), ('to-root', '.'), ('absolute-in', "
            f"{root + '/inside'!r}), ('up', '..'), ('to-etc', '/etc'), ('chain', 'to-etc')]:\n"
            "    os.symlink(target, name)"
        )
        assert kernel.execute(code).status == "ok"
    sandbox.write_file("to-inside/a.txt", "through a link")
    assert sandbox.read_file("inside/a.txt") == b"through a link"
    assert sandbox.read_file("absolute-in/a.txt") == b"through a link"
    assert sandbox.read_file("to-root/inside/a.txt") == b"through a link"
    for path in ("up/x", "to-etc/passwd", "chain/passwd", "up"):
        with pytest.raises(InvalidParams, match="out of the workspace"):
            sandbox.read_file(path)


def test_upload_and_download_folders(sandbox: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "skills-src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "__init__.py").write_text("")
    (source / "pkg" / "tool.py").write_text("def run():\n    return 'ran'\n")
    (source / "bin.sh").write_text("#!/bin/sh\n")
    (source / "bin.sh").chmod(0o755)
    (source / "link.py").symlink_to(source / "pkg" / "tool.py")  # not followed, not uploaded
    sandbox.upload(source, "skills")
    with sandbox.start_kernel() as kernel:  # the mode came along
        assert kernel.execute("import os; oct(os.stat('skills/bin.sh').st_mode & 0o777)").text == "'0o755'\n"
    assert sandbox.skill_sources(["pkg.tool"]).sources["pkg.tool"] == "def run():\n    return 'ran'\n"
    assert "skills/link.py" not in {e.path for e in sandbox.list_files("skills", recursive=True)}
    back = tmp_path / "back"
    sandbox.download("skills", back)
    assert (back / "pkg" / "tool.py").read_text() == "def run():\n    return 'ran'\n"
    assert (back / "bin.sh").read_text() == "#!/bin/sh\n"
    assert not (back / "link.py").exists()
    single = tmp_path / "one.py"
    sandbox.download("skills/pkg/tool.py", single)
    assert single.read_text().startswith("def run")


def test_file_methods_name_unknown_sandboxes_and_bad_params(daemon: Daemon) -> None:
    missing = daemon.response(daemon.start("cellbox/readFile", {"sandboxId": "sb-nope", "path": "x"}))
    assert missing["error"]["code"] == 1001
    sandbox = daemon.request("cellbox/createSandbox", {})["sandboxId"]
    bad = daemon.response(
        daemon.start("cellbox/writeFile", {"sandboxId": sandbox, "path": "x", "content": "not base64!"})
    )
    assert bad["error"]["code"] == -32602 and "$.content" in bad["error"]["message"]
    negative = daemon.response(
        daemon.start("cellbox/readFile", {"sandboxId": sandbox, "path": "x", "offset": -1})
    )
    assert negative["error"]["code"] == -32602 and "$.offset" in negative["error"]["message"]
