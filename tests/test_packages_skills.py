"""installPackage and getSkillSources against a real daemon, pip and PyPI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import new_kernel
from tests.rpc import Daemon

# small, pure Python, and not a dependency of cellbox
PACKAGE, VERSION = "tinydb", "4.8.2"


@pytest.fixture(scope="module")
def installed(shared_daemon: Daemon) -> dict:
    """A sandbox with a kernel started before `tinydb` was installed into it."""
    assert importlib.util.find_spec(PACKAGE) is None, f"{PACKAGE} must not be in the test environment"
    d = shared_daemon
    created = d.request("cellbox/createSandbox", {})
    kernel = d.request("cellbox/startKernel", {"sandboxId": created["sandboxId"]})["kernelId"]
    missing = d.request("cellbox/execute", {"kernelId": kernel, "code": f"import {PACKAGE}"})
    assert missing["status"] == "error" and missing["error"]["ename"] == "ModuleNotFoundError"
    result = d.request(
        "cellbox/installPackage",
        {"sandboxId": created["sandboxId"], "packages": [f"{PACKAGE}=={VERSION}"], "workDoneToken": 77},
        timeout=300,
    )
    return {**created, "kernel": kernel, "result": result}


def test_install_reports_versions_and_progress(shared_daemon: Daemon, installed: dict) -> None:
    assert {"name": PACKAGE, "version": VERSION} in installed["result"]["installed"]
    progress = [p["value"] for p in shared_daemon.notes("$/progress") if p["token"] == 77]
    assert progress[0]["kind"] == "begin" and progress[-1]["kind"] == "end"
    messages = [p.get("message", "") for p in progress if p["kind"] == "report"]
    assert any(PACKAGE in m for m in messages)


def test_installed_package_imports_in_the_running_kernel(shared_daemon: Daemon, installed: dict) -> None:
    result = shared_daemon.request(
        "cellbox/execute",
        {"kernelId": installed["kernel"], "code": f"import {PACKAGE}\n{PACKAGE}.__version__"},
    )
    assert result["status"] == "ok" and result["text"] == f"'{VERSION}'\n"


def test_install_touches_neither_the_daemon_nor_other_sandboxes(
    shared_daemon: Daemon, installed: dict
) -> None:
    probe = subprocess.run([sys.executable, "-c", f"import {PACKAGE}"], capture_output=True)
    assert probe.returncode != 0
    _, other = new_kernel(shared_daemon)
    result = shared_daemon.request("cellbox/execute", {"kernelId": other, "code": f"import {PACKAGE}"})
    assert result["status"] == "error"


def test_a_new_kernel_of_the_sandbox_sees_the_package(shared_daemon: Daemon, installed: dict) -> None:
    kernel = shared_daemon.request("cellbox/startKernel", {"sandboxId": installed["sandboxId"]})["kernelId"]
    result = shared_daemon.request("cellbox/execute", {"kernelId": kernel, "code": f"import {PACKAGE}; 'ok'"})
    assert result["text"] == "'ok'\n"


def test_pip_in_a_cell_installs_into_the_sandbox(shared_daemon: Daemon, installed: dict) -> None:
    code = "!pip install --quiet --disable-pip-version-check cowsay==6.1\nimport cowsay\ncowsay.__file__"
    result = shared_daemon.request(
        "cellbox/execute", {"kernelId": installed["kernel"], "code": code}, timeout=300
    )
    assert result["status"] == "ok", result
    location = result["outputs"][-1]["data"]["text/plain"].strip("'")
    assert location.startswith(str(Path(installed["workspace"]).parent / "venv"))
    assert subprocess.run([sys.executable, "-c", "import cowsay"], capture_output=True).returncode != 0


def test_install_failure_answers_install_failed_with_the_log(shared_daemon: Daemon, installed: dict) -> None:
    response = shared_daemon.response(
        shared_daemon.start(
            "cellbox/installPackage",
            {"sandboxId": installed["sandboxId"], "packages": ["cellbox-no-such-package-xyz==1.0"]},
        ),
        timeout=300,
    )
    error = response["error"]
    assert error["code"] == 1005
    assert "cellbox-no-such-package-xyz" in error["data"]["log"]


def test_an_option_is_never_taken_from_a_package_string(shared_daemon: Daemon, installed: dict) -> None:
    response = shared_daemon.response(
        shared_daemon.start(
            "cellbox/installPackage",
            {"sandboxId": installed["sandboxId"], "packages": ["--target=/tmp/evil"]},
        ),
        timeout=300,
    )
    assert response["error"]["code"] == 1005
    assert not Path("/tmp/evil").exists()


def test_skill_sources_of_skills_and_installed_packages(shared_daemon: Daemon, installed: dict) -> None:
    skills = Path(installed["workspace"]) / "skills"
    (skills / "weather").mkdir()
    (skills / "weather" / "__init__.py").write_text("raise RuntimeError('package top-level code ran')\n")
    source = (
        "from tinydb import TinyDB\n\n"
        "open('side-effect.txt', 'w').write('module top-level code ran')\n\n"
        "def forecast(city: str) -> str:\n"
        '    """The weather in `city`."""\n'
        "    return 'sunny'\n"
    )
    (skills / "weather" / "api.py").write_text(source)
    result = shared_daemon.request(
        "cellbox/getSkillSources",
        {"sandboxId": installed["sandboxId"], "modules": ["weather.api", "tinydb.table"]},
    )
    assert result["sources"]["weather.api"] == source
    assert "class Table" in result["sources"]["tinydb.table"]
    assert result["formatted"] == (
        f"```python\n# Module: weather.api\n\n{source}\n```"
        "\n\n"
        f"```python\n# Module: tinydb.table\n\n{result['sources']['tinydb.table']}\n```"
    )
    assert not (Path(installed["workspace"]) / "side-effect.txt").exists()


def test_unknown_module_answers_module_not_found(shared_daemon: Daemon, installed: dict) -> None:
    for modules, missing in (
        (["json", "no_such_module_abc"], "no_such_module_abc"),
        (["tinydb.no_such_sub"], "tinydb.no_such_sub"),
        (["sys"], "sys"),  # built in: there is no source to give
    ):
        response = shared_daemon.response(
            shared_daemon.start(
                "cellbox/getSkillSources", {"sandboxId": installed["sandboxId"], "modules": modules}
            )
        )
        error = response["error"]
        assert error["code"] == 1006 and error["data"]["module"] == missing, error
        assert missing in error["message"]


def test_modules_below_any_kind_of_parent_are_found_or_module_not_found(
    shared_daemon: Daemon, installed: dict
) -> None:
    skills = Path(installed["workspace"]) / "skills"
    ran = Path(installed["workspace"]) / "ran.txt"
    run_marker = f"open({str(ran)!r}, 'w').write('ran')\n"
    # a regular package holding a namespace package (no __init__), as freeact_skills does
    (skills / "regular" / "space" / "deeper").mkdir(parents=True)
    (skills / "regular" / "__init__.py").write_text(run_marker)
    (skills / "regular" / "space" / "deeper" / "mod.py").write_text("A = 1\n")
    (skills / "regular" / "other.py").write_text("D = 4\n")
    # namespace packages all the way down
    (skills / "nsonly" / "inner").mkdir(parents=True)
    (skills / "nsonly" / "inner" / "leaf.py").write_text("B = 2\n")
    # a package whose __init__ cannot even be compiled
    (skills / "broken").mkdir()
    (skills / "broken" / "__init__.py").write_text("def (:\n" + run_marker)
    (skills / "broken" / "child.py").write_text("C = 3\n")
    # a print at the interpreter's start, as a .pth file in the sandbox could make
    (skills / "sitecustomize.py").write_text('print(\'{"sources": {"forged": 1}}\')\n')

    def ask(*modules: str) -> dict:
        return shared_daemon.response(
            shared_daemon.start(
                "cellbox/getSkillSources", {"sandboxId": installed["sandboxId"], "modules": list(modules)}
            )
        )

    try:
        # several below one package, and the package itself after them
        modules = (
            "regular.space.deeper.mod",
            "regular.other",
            "regular",
            "nsonly.inner.leaf",
            "broken.child",
        )
        found = ask(*modules)["result"]["sources"]
    finally:
        (skills / "sitecustomize.py").unlink()
    assert found == {
        "regular.space.deeper.mod": "A = 1\n",
        "regular.other": "D = 4\n",
        "regular": run_marker,
        "nsonly.inner.leaf": "B = 2\n",
        "broken.child": "C = 3\n",
    }
    for missing in (
        "regular.space.gone.api",  # below a namespace package: was a KeyError, -32603
        "regular.space.deeper.mod.x",  # below a module
        "nsonly.nothing",
        "nsonly.inner",  # a namespace package has no source
        "broken.gone",
        "math.sub",  # below a compiled module
        "no_such_parent.child",
    ):
        error = ask(missing)["error"]
        assert error["code"] == 1006 and error["data"]["module"] == missing, error
    assert not ran.exists()
