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

# Runs in the sandbox's interpreter: argv[1:] are module names; prints a JSON object
# {"sources": {name: source}} or {"missing": name, "reason": why}.
_RESOLVER = r"""
import importlib.machinery, importlib.util, json, sys

def find(name):
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: i + 1]), list(spec.submodule_search_locations)
        )
    return spec

def main(names):
    sources = {}
    for name in names:
        try:
            spec = find(name)
        except (ImportError, ValueError) as exc:
            return {"missing": name, "reason": str(exc)}
        if spec is None:
            return {"missing": name, "reason": "no module named %r" % name}
        source = None
        loader = spec.loader
        if loader is not None and hasattr(loader, "get_source"):
            try:
                source = loader.get_source(spec.name)
            except ImportError:
                source = None
        if source is None:
            kind = "a namespace package" if spec.origin in (None, "namespace") else "not Python source"
            return {"missing": name, "reason": "%r has no source (%s: %s)" % (name, kind, spec.origin)}
        sources[name] = source
    return {"sources": sources}

sys.stdout.write(json.dumps(main(sys.argv[1:])))
"""


class _Answer(msgspec.Struct):
    sources: dict[str, str] = {}
    missing: str | None = None
    reason: str = ""


def format_sources(modules: list[str], sources: dict[str, str]) -> str:
    return "\n\n".join(f"```python\n# Module: {name}\n\n{sources[name]}\n```" for name in modules)


async def skill_sources(runtime: SandboxRuntime, modules: list[str]) -> t.GetSkillSourcesResult:
    unique = list(dict.fromkeys(modules))
    result = await runtime.run([runtime.python, "-c", _RESOLVER, *unique])
    try:
        answer = msgspec.json.decode(result.stdout, type=_Answer)
    except msgspec.DecodeError:
        raise errors.InternalError(
            f"looking up module sources failed (exit code {result.returncode}): {result.stderr.strip()}"
        ) from None
    if answer.missing is not None:
        raise errors.ModuleNotFound(
            f"module {answer.missing!r} not found in the sandbox: {answer.reason}", {"module": answer.missing}
        )
    return t.GetSkillSourcesResult(sources=answer.sources, formatted=format_sources(unique, answer.sources))
