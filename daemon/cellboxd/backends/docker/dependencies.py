"""Dependency files in Poetry's dependency specification format, as freeact documents them.

A dependency file is the body of a `[tool.poetry.dependencies]` table: one `name = spec` line
per dependency, comments and blank lines allowed, `python = "..."` for the Python version.
Each line is decoded as TOML on its own, so that an error names its line; poetry-core builds
the dependency and gives its PEP 508 form, which pip installs. Where poetry-core's form is not
one pip takes, or a Poetry option has no pip equivalent, the line is refused rather than
silently changed.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidName, canonicalize_name
from poetry.core.constraints.version import VersionConstraint, parse_constraint
from poetry.core.constraints.version.exceptions import ParseConstraintError
from poetry.core.factory import Factory
from poetry.core.version.markers import parse_marker

from cellbox import errors


class Dependencies(msgspec.Struct, frozen=True):
    requirements: list[str]
    """PEP 508 strings, in file order, pip-installable."""
    python: str | None
    """The `python = "..."` constraint as written, or None."""


# The keys of a dependency table by its form, after poetry-core's poetry-schema.json (which
# poetry-core itself does not apply to a single dependency: it ignores unknown keys). The form
# is the first of `git`, `url`, `path`, `file` the table has, else `version`.
_COMMON_KEYS: dict[str, type] = {
    "python": str,
    "platform": str,
    "markers": str,
    "optional": bool,
    "extras": list,
}
_FORM_KEYS: dict[str, dict[str, type]] = {
    "git": {
        "git": str,
        "branch": str,
        "tag": str,
        "rev": str,
        "subdirectory": str,
        "develop": bool,
        "allow-prereleases": bool,
        "allows-prereleases": bool,
    },
    "url": {"url": str, "subdirectory": str},
    "path": {"path": str, "subdirectory": str, "develop": bool},
    "file": {"file": str, "subdirectory": str},
    "version": {"version": str, "allow-prereleases": bool, "allows-prereleases": bool, "source": str},
}
_KNOWN_KEYS = set(_COMMON_KEYS).union(*_FORM_KEYS.values())
_TYPE_NAMES = {str: "a string", bool: "true or false", list: "a list of strings"}

_HEADER: dict[str, Any] = {"tool": {"poetry": {"dependencies": {}}}}
_TOML_POSITION = re.compile(r" \(at line \d+, column (\d+)\)$")

VARIANTS: dict[str, str] = {
    # ipykernel is not listed: the image build always adds it
    "minimal": "",
    "basic": 'numpy = "^2.2"\npandas = "^3.0"\nmatplotlib = "^3.10"\nsympy = "^1.14"\n',
    "example": 'numpy = "^2.2"\npandas = "^3.0"\nmatplotlib = "^3.10"\nrequests = "^2.32"\n',
}


class _LineError(Exception):
    """What is wrong with the line at hand; `parse_dependencies` adds which line it is."""


def parse_dependencies(text: str) -> Dependencies:
    """Parse a dependency file.

    Raises `InvalidDependencies` with `data = {"line": <the line, stripped>, "lineNumber": <1-based>}`
    for the first line that is not valid: not TOML `name = value`, an invalid constraint, version,
    marker or name, a table with unknown keys or values of the wrong type, a name given twice, or
    a form pip cannot install.
    """
    requirements: list[str] = []
    python: str | None = None
    first_lines: dict[str, int] = {}  # canonical name -> line number
    header_allowed = True
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        try:
            decoded = _decode(line)
            if not decoded:  # blank or a comment
                continue
            if line.startswith("["):
                if decoded != _HEADER:
                    raise _LineError(
                        "a table header: a dependency file holds only the lines of [tool.poetry.dependencies]"
                    )
                if not header_allowed:
                    raise _LineError("the [tool.poetry.dependencies] header can only come first")
                header_allowed = False
                continue
            header_allowed = False
            [(name, spec)] = decoded.items()
            canonical = _canonical_name(name)
            if canonical in first_lines:
                raise _LineError(f"{name!r} is given twice (first on line {first_lines[canonical]})")
            first_lines[canonical] = number
            if canonical == "python":
                python = _python_constraint(spec)
            else:
                requirements.extend(_requirements(name, spec))
        except _LineError as e:
            raise errors.InvalidDependencies(
                f'line {number}: "{line}": {e}', {"line": line, "lineNumber": number}
            ) from None
    return Dependencies(requirements=requirements, python=python)


def variant_dependencies(variant: str) -> Dependencies:
    """The dependencies of a built-in variant; ValueError for an unknown one."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return parse_dependencies(VARIANTS[variant])


def requirements_hash(deps: Dependencies) -> str:
    """A stable sha256 hex digest of the requirements and the Python constraint."""
    return hashlib.sha256(msgspec.json.encode(deps)).hexdigest()


def _decode(line: str) -> dict[str, Any]:
    try:
        return tomllib.loads(line)
    except tomllib.TOMLDecodeError as e:
        # tomllib counts lines within the one line it was given: keep only the column
        reason = _TOML_POSITION.sub(r" at column \1", str(e)).replace(
            "(at end of document)", "at end of line"
        )
        raise _LineError(f"not valid TOML ({reason})") from None


def _canonical_name(name: str) -> str:
    try:
        return canonicalize_name(name, validate=True)
    except InvalidName:
        raise _LineError(f"invalid package name {name!r}") from None


def _python_constraint(spec: object) -> str:
    if not isinstance(spec, str):
        raise _LineError("the python constraint must be a string")
    if _parse_constraint("python", spec).is_empty():
        raise _LineError(f"python constraint {spec!r} allows no Python version")
    return spec


def _requirements(name: str, spec: object) -> list[str]:
    """One PEP 508 string, or one per item of a list of constraints (Poetry's multiple constraints)."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise _LineError("an empty list of constraints")
    return [_requirement(name, item) for item in specs]


def _requirement(name: str, spec: object) -> str:
    if isinstance(spec, str):
        _parse_constraint("version", spec)
    elif isinstance(spec, dict):
        _check_table(spec)
    else:
        raise _LineError(f"expected a version constraint string or a table, not {type(spec).__name__}")
    try:
        dependency = Factory.create_dependency(name, spec)
    except ValueError as e:  # a git or url that is not one
        raise _LineError(str(e)) from None
    if dependency.marker.is_empty():
        raise _LineError("its python, platform and markers exclude each other: it would never be installed")
    requirement = dependency.to_pep_508()
    try:
        Requirement(requirement)
    except InvalidRequirement as e:
        reason = (
            "PEP 508 has no union '||' of version ranges" if "||" in requirement else str(e).splitlines()[0]
        )
        raise _LineError(f"poetry-core makes it {requirement!r}, which pip cannot take ({reason})") from None
    return requirement


def _check_table(table: dict[str, Any]) -> None:
    form = next((key for key in ("git", "url", "path", "file") if key in table), "version")
    allowed = _COMMON_KEYS | _FORM_KEYS[form]
    for key, value in table.items():
        if key not in allowed:
            raise _LineError(
                f"key {key!r} does not go with {form!r}" if key in _KNOWN_KEYS else f"unknown key {key!r}"
            )
        expected = allowed[key]
        if not isinstance(value, expected) or (
            isinstance(value, list) and not all(isinstance(item, str) for item in value)
        ):
            raise _LineError(f"{key!r} must be {_TYPE_NAMES[expected]}")
    if form == "version" and "version" not in table:
        raise _LineError("a table needs one of 'version', 'git', 'url', 'path' or 'file'")
    for key in ("version", "python"):
        if key in table:
            _parse_constraint(key, table[key])
    if "markers" in table:
        try:
            parse_marker(table["markers"])
        except Exception:  # poetry-core lets its parser's (lark's) errors through
            raise _LineError(f"invalid markers {table['markers']!r}") from None
    if len({"branch", "tag", "rev"} & table.keys()) > 1:
        raise _LineError("give only one of 'branch', 'tag' and 'rev'")
    _check_pip_can_take(form, table)


def _check_pip_can_take(form: str, table: dict[str, Any]) -> None:
    """Refuse the Poetry options a PEP 508 string cannot carry, rather than drop them."""
    if table.get("optional"):
        raise _LineError("optional = true: an optional dependency is installed only through an extra")
    if table.get("develop"):
        raise _LineError("develop = true: an editable install has no PEP 508 form")
    if table.get("allow-prereleases") or table.get("allows-prereleases"):
        raise _LineError(
            "allow-prereleases = true has no PEP 508 form; "
            "write a pre-release in the constraint instead (e.g. '>=2.0b1'), pip then allows them"
        )
    source = table.get("source")
    if source is not None and source.lower() != "pypi":
        raise _LineError(
            f"source {source!r} names a package source a dependency file cannot define; "
            "use 'url' or 'git' for a package that is not on PyPI"
        )
    if form in ("path", "file") and not Path(table[form]).is_absolute():
        raise _LineError(
            f"{form} {table[form]!r} must be absolute: a dependency file has no folder to be relative to"
        )


def _parse_constraint(what: str, constraint: str) -> VersionConstraint:
    try:
        return parse_constraint(constraint)
    except ParseConstraintError:
        raise _LineError(f"invalid {what} constraint {constraint!r}") from None
