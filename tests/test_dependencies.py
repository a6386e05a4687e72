"""Dependency files in Poetry's format: what each form becomes for pip, and the lines refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cellbox.errors import InvalidDependencies
from cellboxd.backends.docker.dependencies import (
    VARIANTS,
    Dependencies,
    parse_dependencies,
    requirements_hash,
    variant_dependencies,
)

# freeact's example, every form of the task, with the header, comments and blank lines
FILE = """\
[tool.poetry.dependencies]
# the skills of freeact
freeact-skills = {version = "*", extras = ["all"]}
pandas = "^2.2"
requests = ">=2.31,<3"   # a range
numpy = "~1.26"
rich = "13.*"

attrs = {version = "^23", markers = "sys_platform == 'linux'"}
tomli = {version = "^2", python = "<3.11"}
mylib = {git = "https://github.com/org/mylib.git", rev = "v1.2"}
other = {url = "https://example.com/other-1.0-py3-none-any.whl"}
local = {path = "/abs/path/to/pkg"}
python = "^3.11"
"""

FILE_REQUIREMENTS = [
    "freeact-skills[all]",
    "pandas (>=2.2,<3.0)",
    "requests (>=2.31,<3)",
    "numpy (>=1.26,<1.27)",
    "rich (==13.*)",
    'attrs (>=23,<24) ; sys_platform == "linux"',
    'tomli (>=2,<3) ; python_version < "3.11"',
    "mylib @ git+https://github.com/org/mylib.git@v1.2",
    "other @ https://example.com/other-1.0-py3-none-any.whl",
    "local @ file:///abs/path/to/pkg",
]


def test_the_example_file() -> None:
    assert parse_dependencies(FILE) == Dependencies(requirements=FILE_REQUIREMENTS, python="^3.11")


@pytest.mark.parametrize(
    ("line", "requirements"),
    [
        ('pandas = "^2.2"', ["pandas (>=2.2,<3.0)"]),
        ('caret = "^0.2.3"', ["caret (>=0.2.3,<0.3.0)"]),
        ('numpy = "~1.26"', ["numpy (>=1.26,<1.27)"]),
        ('compatible = "~=1.4"', ["compatible (>=1.4,<2.0)"]),
        ('rich = "13.*"', ["rich (==13.*)"]),
        ('exact = "1.2.3"', ["exact (==1.2.3)"]),
        ('excluded = "!=1.0,!=1.1"', ["excluded (!=1.0,!=1.1)"]),
        ('prerelease = ">=2.0b1,<3"', ["prerelease (>=2.0b1,<3)"]),
        ('anything = "*"', ["anything"]),
        ('Mixed_Case = "^1"', ["Mixed_Case (>=1,<2)"]),
        ('"quoted" = "^1"', ["quoted (>=1,<2)"]),
        ('freeact-skills = {version = "*", extras = ["all"]}', ["freeact-skills[all]"]),
        (
            'req = {version = "^2.31", extras = ["socks", "use-chardet-on-py3"]}',
            ["req[socks,use-chardet-on-py3] (>=2.31,<3.0)"],
        ),
        (
            'attrs = {version = "^23", markers = "sys_platform == \'linux\'"}',
            ['attrs (>=23,<24) ; sys_platform == "linux"'],
        ),
        ('tomli = {version = "^2", python = "<3.11"}', ['tomli (>=2,<3) ; python_version < "3.11"']),
        (
            'caret_python = {version = "^1", python = "^3.11"}',
            ['caret_python (>=1,<2) ; python_version >= "3.11" and python_version < "4.0"'],
        ),
        (
            'patch_python = {version = "^1", python = "<3.11.4"}',
            ['patch_python (>=1,<2) ; python_full_version < "3.11.4"'],
        ),
        (
            'both = {version = "^2", python = "<3.11", markers = "sys_platform == \'linux\'"}',
            ['both (>=2,<3) ; sys_platform == "linux" and python_version < "3.11"'],
        ),
        ('platform = {version = "^1", platform = "linux"}', ['platform (>=1,<2) ; sys_platform == "linux"']),
        ('from_pypi = {version = "^1", source = "pypi"}', ["from_pypi (>=1,<2)"]),
        ('not_optional = {version = "^1", optional = false}', ["not_optional (>=1,<2)"]),
        (
            'split = [{version = "^1", python = "<3.11"}, {version = "^2", python = ">=3.11"}]',
            ['split (>=1,<2) ; python_version < "3.11"', 'split (>=2,<3) ; python_version >= "3.11"'],
        ),
        (
            'mylib = {git = "https://github.com/org/mylib.git", rev = "v1.2"}',
            ["mylib @ git+https://github.com/org/mylib.git@v1.2"],
        ),
        (
            'branch = {git = "https://github.com/org/b.git", branch = "main"}',
            ["branch @ git+https://github.com/org/b.git@main"],
        ),
        ('head = {git = "https://github.com/org/h.git"}', ["head @ git+https://github.com/org/h.git"]),
        (
            'ssh = {git = "git@github.com:org/ssh.git", tag = "v1"}',
            ["ssh @ git+ssh://git@github.com/org/ssh.git@v1"],
        ),
        (
            'sub = {git = "https://github.com/org/m.git", subdirectory = "pkg", extras = ["x"]}',
            ["sub[x] @ git+https://github.com/org/m.git#subdirectory=pkg"],
        ),
        (
            'other = {url = "https://example.com/other-1.0-py3-none-any.whl"}',
            ["other @ https://example.com/other-1.0-py3-none-any.whl"],
        ),
        (
            'marked_url = {url = "https://example.com/m-1.0.tar.gz", python = "<3.12"}',
            ['marked_url @ https://example.com/m-1.0.tar.gz ; python_version < "3.12"'],
        ),
        ('local = {path = "/abs/path/to/pkg"}', ["local @ file:///abs/path/to/pkg"]),
        (
            'wheel = {file = "/abs/wheel-1.0-py3-none-any.whl"}',
            ["wheel @ file:///abs/wheel-1.0-py3-none-any.whl"],
        ),
    ],
)
def test_each_form_becomes_pep_508(line: str, requirements: list[str]) -> None:
    assert parse_dependencies(line) == Dependencies(requirements=requirements, python=None)


def test_comments_blank_lines_and_the_header_are_skipped() -> None:
    text = (
        '\n# nothing but comments\n  \n[tool.poetry.dependencies]  # the header\n\npython = ">=3.11,<3.14"\n'
    )
    assert parse_dependencies(text) == Dependencies(requirements=[], python=">=3.11,<3.14")
    assert parse_dependencies("") == Dependencies(requirements=[], python=None)
    assert parse_dependencies('a = "^1"\r\nb = "^2"\r\n').requirements == ["a (>=1,<2)", "b (>=2,<3)"]


@pytest.mark.parametrize(
    ("text", "number", "message"),
    [
        ('pandas = "^2.2"\nrich = ^13', 2, "not valid TOML (Invalid value at column 8)"),
        ('a = {version = "^1",', 1, "not valid TOML"),
        ('a = "1" b = "2"', 1, "not valid TOML"),
        ('foo = {version = "^1", colour = "red"}', 1, "unknown key 'colour'"),
        ('x = "1"\ny = "2"\nz = "3"\nbar = "^^1"', 4, "invalid version constraint '^^1'"),
        ('bar = {version = "1.0 - 2.0"}', 1, "invalid version constraint '1.0 - 2.0'"),
        ('bar = {version = "^1", python = "^^3"}', 1, "invalid python constraint '^^3'"),
        ('bar = {version = "^1", markers = "sys_platform = \'linux\'"}', 1, "invalid markers"),
        ('bar = {version = "^1", extras = "all"}', 1, "'extras' must be a list of strings"),
        ('bar = {version = "^1", extras = [1]}', 1, "'extras' must be a list of strings"),
        ("bar = {version = 1}", 1, "'version' must be a string"),
        ('bar = {version = "^1", optional = "yes"}', 1, "'optional' must be true or false"),
        ('bar = {extras = ["x"]}', 1, "a table needs one of 'version', 'git', 'url', 'path' or 'file'"),
        (
            'bar = {git = "https://github.com/o/b.git", version = "^1"}',
            1,
            "key 'version' does not go with 'git'",
        ),
        ('bar = {git = "https://github.com/o/b.git", branch = "a", rev = "b"}', 1, "only one of"),
        ('bar = {git = "not a url"}', 1, 'Invalid git url "not a url"'),
        ('bar = {url = "not a url"}', 1, "does not seem like a valid url"),
        ('bar = {git = "https://github.com/o/b.git", rev = "a b"}', 1, "which pip cannot take"),
        ("bar = 1", 1, "expected a version constraint string or a table, not int"),
        ("bar = []", 1, "an empty list of constraints"),
        ('bar = "^1 || ^3"', 1, "PEP 508 has no union '||'"),
        ('"bar baz" = "^1"', 1, "invalid package name 'bar baz'"),
        ('pandas = "^2"\n\n# again\nPandas = "^2.2"', 4, "'Pandas' is given twice (first on line 1)"),
        ('python = "^3.11"\npython = "^3.12"', 2, "'python' is given twice (first on line 1)"),
        ('python = "^^3"', 1, "invalid python constraint '^^3'"),
        ('python = ">=3.12,<3.11"', 1, "allows no Python version"),
        ('python = {version = "^3.11"}', 1, "the python constraint must be a string"),
        (
            'bar = {version = "^1", source = "private-repo"}',
            1,
            "source 'private-repo' names a package source",
        ),
        ('bar = {path = "../pkg"}', 1, "path '../pkg' must be absolute"),
        ('bar = {file = "dist/bar-1.0-py3-none-any.whl"}', 1, "must be absolute"),
        (
            'bar = {path = "/abs/pkg", develop = true}',
            1,
            "develop = true: an editable install has no PEP 508 form",
        ),
        ('bar = {version = "^1", optional = true}', 1, "optional = true"),
        (
            'bar = {version = "^1", allow-prereleases = true}',
            1,
            "allow-prereleases = true has no PEP 508 form",
        ),
        (
            'bar = {version = "^1", python = "<3.10", markers = "python_version >= \'3.12\'"}',
            1,
            "it would never be installed",
        ),
        ("[project]", 1, "a table header"),
        ("[tool.poetry.group.dev.dependencies]", 1, "a table header"),
        ('a = "^1"\n[tool.poetry.dependencies]', 2, "header can only come first"),
    ],
)
def test_a_bad_line_is_named_with_its_number(text: str, number: int, message: str) -> None:
    line = text.split("\n")[number - 1].strip()
    with pytest.raises(InvalidDependencies) as caught:
        parse_dependencies(text)
    assert caught.value.data == {"line": line, "lineNumber": number}
    assert caught.value.message.startswith(f'line {number}: "{line}": ')
    assert message in caught.value.message


def test_the_messages_read_as_documented() -> None:
    cases = {
        "pandas = ^2.2": 'line 1: "pandas = ^2.2": not valid TOML (Invalid value at column 10)',
        'foo = {version = "^1", colour = "red"}': (
            'line 1: "foo = {version = "^1", colour = "red"}": unknown key \'colour\''
        ),
        'bar = "^^1"': 'line 1: "bar = "^^1"": invalid version constraint \'^^1\'',
    }
    for text, message in cases.items():
        with pytest.raises(InvalidDependencies) as caught:
            parse_dependencies(text)
        assert caught.value.message == message


def test_variants() -> None:
    assert set(VARIANTS) == {"minimal", "basic", "example"}
    assert variant_dependencies("minimal") == Dependencies(requirements=[], python=None)
    assert variant_dependencies("basic").requirements == [
        "numpy (>=2.2,<3.0)",
        "pandas (>=3.0,<4.0)",
        "matplotlib (>=3.10,<4.0)",
        "sympy (>=1.14,<2.0)",
    ]
    assert variant_dependencies("example").requirements == [
        "numpy (>=2.2,<3.0)",
        "pandas (>=3.0,<4.0)",
        "matplotlib (>=3.10,<4.0)",
        "requests (>=2.32,<3.0)",
    ]
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        variant_dependencies("huge")


def test_requirements_hash_is_stable_and_ignores_layout() -> None:
    deps = Dependencies(requirements=["pandas (>=2.2,<3.0)"], python="^3.11")
    # a label on existing images: the value must not change from one release to the next
    expected = hashlib.sha256(b'{"requirements":["pandas (>=2.2,<3.0)"],"python":"^3.11"}').hexdigest()
    assert requirements_hash(deps) == expected
    relaid = parse_dependencies('# comment\n\npandas   =   "^2.2"  # why\npython="^3.11"\n')
    assert requirements_hash(relaid) == expected
    assert requirements_hash(Dependencies(requirements=deps.requirements, python="^3.12")) != expected
    assert requirements_hash(Dependencies(requirements=[], python=None)) != expected


def test_every_requirement_is_valid_pep_508() -> None:
    requirements = parse_dependencies(FILE).requirements
    parsed = [Requirement(requirement) for requirement in requirements]
    assert [r.name for r in parsed] == [
        "freeact-skills",
        "pandas",
        "requests",
        "numpy",
        "rich",
        "attrs",
        "tomli",
        "mylib",
        "other",
        "local",
    ]
    assert parsed[0].extras == {"all"}
    assert parsed[1].specifier == SpecifierSet(">=2.2,<3.0")
    assert str(parsed[6].marker) == 'python_version < "3.11"'
    assert parsed[7].url == "git+https://github.com/org/mylib.git@v1.2"


@pytest.mark.timeout(180)
def test_pip_takes_a_caret_and_an_extras_form_network() -> None:
    """Needs the network: pip resolves the requirements against PyPI (a dry run installs nothing)."""
    deps = parse_dependencies(
        'requests = {version = "^2.31", extras = ["socks"]}\n'
        'idna = "^3.6"\n'
        'tomli = {version = "^2", python = "<3.11"}\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            "-",
            "--",
            *deps.requirements,
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    installs = {item["metadata"]["name"].lower(): item for item in json.loads(proc.stdout)["install"]}
    # tomli's marker excludes Python 3.11 and later, the Python of these tests
    assert set(installs) == {"requests", "idna"}
    assert installs["requests"]["requested_extras"] == ["socks"]
    assert installs["requests"]["metadata"]["version"].startswith("2.")
    assert installs["idna"]["metadata"]["version"].startswith("3.")
