"""Python modules from an MCP server's tools: `mcptools.<server>.<function>` in a sandbox.

Everything a server says (tool names, parameter names, descriptions, schemas) is untrusted:
it reaches the generated code only as identifiers made from it by `identifier` (ASCII letters,
digits and underscores, never a keyword, a builtin's name or one of the module's own names),
as `repr` literals, or in docstrings escaped so that they cannot end early. Every module is
parsed again before it is written, and must have exactly the shape made here.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cellbox import types as t

if TYPE_CHECKING:
    import mcp_types

DESCRIPTION_CAP = 20_000  # characters of a tool's description kept in its docstring
MAX_TOOLS = 1000  # tools of one server made modules; a server that lists more is refused
MAX_PARAMS = 256  # parameters of one tool; a tool with more is left out
_DEPTH = 6  # levels of a schema turned into a type; deeper is Any
_NODES = 2000  # schema nodes one tool's types are made of; past them, Any (a $ref may repeat)
_ENUM_CAP = 64  # values of an enum written as a Literal; more is the base type
# names the generated modules define or import themselves
_OWN = {"annotations", "Any", "Literal", "call", "mcptools"}
_RESERVED = frozenset([*keyword.kwlist, *keyword.softkwlist, *dir(builtins), *_OWN])
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_WORD = re.compile(r"[^A-Za-z0-9_]+")
_JSON_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}


class CodegenError(Exception):
    """A tool that cannot be made a module (it is left out), or a server that cannot be made a
    package (it is refused)."""


class Module:
    """One tool's module: its function's name, and its source."""

    def __init__(self, tool: t.McpTool, source: str) -> None:
        self.tool = tool
        self.source = source


class Names:
    """Gives out distinct safe identifiers, in linear time however the names collide."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._used = set(taken)
        self._next: dict[str, int] = {}  # per base, the number to try next

    def take(self, name: str) -> str:
        base = re.sub(r"_+", "_", _NOT_WORD.sub("_", _CAMEL.sub("_", name)).strip("_").lower()) or "tool"
        if base[0].isdigit():
            base = "n_" + base
        candidate = _safe(base)
        n = self._next.get(base, 2)
        while candidate in self._used:
            candidate, n = _safe(f"{base}_{n}"), n + 1
        self._next[base] = n
        self._used.add(candidate)
        return candidate


def _safe(name: str) -> str:
    return name + "_" if name in _RESERVED else name


def identifier(name: str, taken: Iterable[str] = ()) -> str:
    """A safe Python identifier for `name`, in snake_case, not among `taken`."""
    return Names(taken).take(name)


def docstring(text: str, indent: str = "") -> str:
    """`text` as a triple-quoted literal whose value is `text` (control characters but newlines
    and tabs dropped), indented by `indent` after each newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or c.isprintable())
    body = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if body.endswith('"'):
        body = body[:-1] + '\\"'
    literal = '"""' + _indented(body, indent) + ("\n" + indent if "\n" in body else "") + '"""'
    if ast.literal_eval(literal) != _indented(text, indent) + ("\n" + indent if "\n" in text else ""):
        raise CodegenError("a docstring does not hold its text")  # never seen: the escapes above
    return literal


def _indented(text: str, indent: str) -> str:
    """`text` with `indent` before each line but the first, and none on empty lines."""
    first, *rest = text.split("\n")
    return "\n".join([first, *(indent + line if line else "" for line in rest)])


class _Budget:
    """Schema nodes left to turn into types: `$ref`s can make a small schema a huge type."""

    def __init__(self, nodes: int = _NODES) -> None:
        self.nodes = nodes


def python_type(
    schema: Any, depth: int = 0, defs: dict[str, Any] | None = None, budget: _Budget | None = None
) -> str:
    """A type annotation (as source) for a JSON schema; Any where the schema says too little.
    `defs` are the root schema's `$defs`, for the local `$ref`s into them."""
    budget = budget or _Budget()
    budget.nodes -= 1
    if not isinstance(schema, dict) or depth > _DEPTH or budget.nodes < 0:
        return "Any"
    ref = schema.get("$ref")
    if isinstance(ref, str) and defs is not None:
        name = ref.removeprefix("#/$defs/").removeprefix("#/definitions/")
        return python_type(defs.get(name), depth + 1, defs, budget) if name != ref else "Any"
    if "const" in schema and _literal(schema["const"]):
        return f"Literal[{schema['const']!r}]"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and len(enum) <= _ENUM_CAP and all(_literal(v) for v in enum):
        return "Literal[" + ", ".join(repr(v) for v in dict.fromkeys(enum)) + "]"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _union(python_type(option, depth + 1, defs, budget) for option in options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _union(python_type({**schema, "type": k}, depth + 1, defs, budget) for k in kind)
    if kind == "array":
        return f"list[{python_type(schema.get('items'), depth + 1, defs, budget)}]"
    if kind == "object":
        values = schema.get("additionalProperties")
        value = python_type(values, depth + 1, defs, budget) if isinstance(values, dict) else "Any"
        return f"dict[str, {value}]"
    return _JSON_TYPES.get(kind, "Any") if isinstance(kind, str) else "Any"


def _literal(value: Any) -> bool:
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    return value is None or isinstance(value, str | int | bool)


def _union(types: Iterable[str]) -> str:
    options = list(dict.fromkeys(types))
    return "Any" if "Any" in options else " | ".join(options)


class _Param:
    def __init__(
        self, name: str, original: str, schema: Any, required: bool, defs: dict[str, Any], budget: _Budget
    ) -> None:
        self.name = name
        self.original = original
        self.schema = schema if isinstance(schema, dict) else {}
        self.required = required
        default = self.schema.get("default", None)
        self.default = None if required or not _literal(default) else default
        self.type = python_type(self.schema, defs=defs, budget=budget)
        if not required and self.default is None and self.type != "Any" and "None" not in self.type:
            self.type += " | None"


def _params(tool: mcp_types.Tool, budget: _Budget) -> list[_Param]:
    schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return []
    if len(properties) > MAX_PARAMS:
        raise CodegenError(f"it has {len(properties)} parameters, more than {MAX_PARAMS}")
    required = schema.get("required")
    required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    names = Names()
    params: list[_Param] = []
    for original, prop in properties.items():
        if isinstance(original, str):
            params.append(
                _Param(names.take(original), original, prop, original in required, _defs(schema), budget)
            )
    return sorted(params, key=lambda p: not p.required)  # required first; the order kept otherwise


def _defs(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", schema.get("definitions"))
    return defs if isinstance(defs, dict) else {}


def _described(schema: dict[str, Any]) -> str:
    text = schema.get("description")
    return " ".join(text.split()) if isinstance(text, str) else ""


def module(server: str, tool: mcp_types.Tool, function: str) -> Module:
    """The module of one tool: a keyword-only function that calls it through the daemon."""
    budget = _Budget()
    params = _params(tool, budget)
    description = (tool.description or "").strip()
    if len(description) > DESCRIPTION_CAP:
        description = description[:DESCRIPTION_CAP] + " [...]"
    doc = [description or f"The tool {tool.name!r} of the MCP server {server!r}."]
    if params:
        doc += ["", "Args:"]
        for p in params:
            renamed = "" if p.name == p.original else f" (the tool's {p.original!r})"
            line = f"{p.name}{renamed}: {_described(p.schema) or p.type}"
            doc.append(textwrap.fill(line, 92, initial_indent="    ", subsequent_indent="        "))
    output = tool.output_schema if isinstance(tool.output_schema, dict) else None
    if output is not None:
        defs = _defs(output)
        returns = (
            "dict[str, Any]"
            if output.get("type") == "object"
            else python_type(output, defs=defs, budget=budget)
        )
        fields = output.get("properties")
        if isinstance(fields, dict) and fields:
            doc += ["", "Returns:", "    A dict (the tool's structured content) with:"]
            for key, value in fields.items():
                if isinstance(key, str):
                    line = (
                        f"    {key!r} ({python_type(value, defs=defs, budget=budget)}): {_described(value)}"
                    )
                    doc.append(line.rstrip().rstrip(":"))
    else:
        returns = "str"
        doc += ["", "Returns:", "    The tool's text."]
    doc += ["", "Raises:", "    mcptools.ToolError: the tool failed."]
    doc += ["    mcptools.ToolCallRejected: the call was not approved."]
    signature = ", ".join(f"{p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}") for p in params)
    arguments = "{" + ", ".join(f"{p.original!r}: {p.name}" for p in params) + "}"
    optional = tuple(p.original for p in params if not p.required and p.default is None)
    lines = [
        docstring(f"The tool {tool.name!r} of the MCP server {server!r}."),
        "",
        "from __future__ import annotations",
        "",
        "from typing import Any, Literal",
        "",
        "from mcptools import call",
        "",
        "",
        f"def {function}(" + (f"*, {signature}" if signature else "") + f") -> {returns}:",
        "    " + docstring("\n".join(doc), "    "),
        f"    return call({server!r}, {tool.name!r}, {arguments}, {optional!r})",
        "",
    ]
    source = "\n".join(lines)
    _check(source, function, len(params))
    entry = t.McpTool(name=tool.name, function=function, description=description)
    return Module(entry, source)


def package(
    server: str, tools: Iterable[mcp_types.Tool]
) -> tuple[dict[str, str], list[t.McpTool], list[str]]:
    """The files of `mcptools.<server>` (paths relative to the package), its tools, and the
    names of the tools left out, each with why."""
    listed = list(tools)
    if len(listed) > MAX_TOOLS:
        raise CodegenError(f"it lists {len(listed)} tools, more than {MAX_TOOLS}")
    files: dict[str, str] = {}
    entries: list[t.McpTool] = []
    skipped: list[str] = []
    names = Names(["__init__"])
    for tool in listed:
        try:
            made = module(server, tool, names.take(tool.name))
        except (CodegenError, RecursionError) as exc:
            skipped.append(f"{tool.name!r}: {exc}")
            continue
        files[f"{made.tool.function}.py"] = made.source
        entries.append(made.tool)
    lines = [f"- {e.function}: {(e.description or e.name or e.function).splitlines()[0]}" for e in entries]
    text = f"The tools of the MCP server {server!r}, one module each:\n\n" + "\n".join(lines) + "\n"
    files["__init__.py"] = docstring(text) + "\n"
    ast.parse(files["__init__.py"])
    return files, entries, skipped


def _check(source: str, function: str, params: int) -> None:
    """Refuses a module of any other shape than made above: nothing a server said escaped."""
    body = ast.parse(source).body
    fn = body[-1] if body else None
    if (
        [type(node).__name__ for node in body]
        != ["Expr", "ImportFrom", "ImportFrom", "ImportFrom", "FunctionDef"]
        or not isinstance(fn, ast.FunctionDef)
        or fn.name != function
        or fn.decorator_list
        or fn.args.args
        or len(fn.args.kwonlyargs) != params
        or [type(node).__name__ for node in fn.body] != ["Expr", "Return"]
    ):
        raise CodegenError("its module came out of another shape")  # never seen: see above
