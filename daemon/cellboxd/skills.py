"""Skill sources: the source of modules as the sandbox's interpreter would import them.

The lookup runs in the sandbox (its interpreter, its path, its runtime-installed packages)
and walks the import system's finders by hand, so that neither the module nor its parent
packages are imported: no top-level code runs.
"""

from __future__ import annotations

import msgspec

from cellbox import errors
from cellbox import types as t
from cellboxd.backends.base import SandboxRuntime

# Runs in the sandbox's interpreter: argv[1:] are module names; prints MARK, then a JSON object
# {"sources": {name: source}} or {"missing": name, "reason": why} (what a `.pth` file printed
# at the interpreter's start comes before MARK). A package found on the way is put into
# sys.modules as an empty module with the `__path__` the import system would give it, never run:
# a namespace package's path is computed from its parent's `__path__`, which the import system
# looks up in sys.modules.
MARK = "\x00cellbox-sources\x00"
_RESOLVER = r"""
import importlib.machinery, importlib.util, json, sys, types

def find(name):
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        path = list(spec.submodule_search_locations)
        if spec.name not in sys.modules:
            sys.modules[spec.name] = parent = types.ModuleType(spec.name)
            parent.__path__, parent.__spec__ = path, spec
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), path)
    return spec

def source_of(name):
    try:
        spec = find(name)
    except Exception as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)
    if spec is None:
        return None, "no module named %r" % name
    try:
        source = spec.loader.get_source(spec.name)
    except Exception:
        source = None
    if not isinstance(source, str):
        kind = "a namespace package" if spec.origin in (None, "namespace") else "not Python source"
        return None, "%r has no source (%s: %s)" % (name, kind, spec.origin)
    return source, ""

def main(names):
    sources = {}
    for name in names:
        source, reason = source_of(name)
        if source is None:
            return {"missing": name, "reason": reason}
        sources[name] = source
    return {"sources": sources}

sys.stdout.write(MARK + json.dumps(main(sys.argv[1:])))
""".replace("MARK", repr(MARK))


class _Answer(msgspec.Struct):
    sources: dict[str, str] = {}
    missing: str | None = None
    reason: str = ""


def format_sources(modules: list[str], sources: dict[str, str]) -> str:
    return "\n\n".join(f"```python\n# Module: {name}\n\n{sources[name]}\n```" for name in modules)


async def skill_sources(runtime: SandboxRuntime, modules: list[str]) -> t.GetSkillSourcesResult:
    unique = list(dict.fromkeys(modules))
    result = await runtime.run([runtime.python, "-c", _RESOLVER, *unique])
    _, mark, answer_json = result.stdout.rpartition(MARK)
    try:
        if not mark:
            raise msgspec.DecodeError("no answer")
        answer = msgspec.json.decode(answer_json, type=_Answer)
    except msgspec.DecodeError:
        raise errors.InternalError(
            f"looking up module sources failed (exit code {result.returncode}): {result.stderr.strip()}"
        ) from None
    if answer.missing is not None:
        raise errors.ModuleNotFound(
            f"module {answer.missing!r} not found in the sandbox: {answer.reason}", {"module": answer.missing}
        )
    return t.GetSkillSourcesResult(sources=answer.sources, formatted=format_sources(unique, answer.sources))
