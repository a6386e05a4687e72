"""JSON Schema of every wire type, generated from the msgspec structs.

`python -m cellbox.schema` prints it; `python -m cellbox.schema --write` updates the
checked-in `protocol/schema.json` that clients in other languages use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from cellbox import methods, types

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.json"


def _ref(tp: type[Any] | None) -> dict[str, Any]:
    if tp is None:
        return {"type": "null"}
    return {"$ref": f"#/$defs/{tp.__name__}"}


def build_schema() -> dict[str, Any]:
    """The schema: every type under `$defs`, and each method's params and result."""
    wire_types: list[Any] = [types.InitializationOptions, types.CellboxCapabilities, types.ErrorData]
    for params, result in methods.REQUESTS.values():
        wire_types.append(params)
        if result is not None:
            wire_types.append(result)
    wire_types.extend(methods.NOTIFICATIONS.values())
    for params, result in methods.CLIENT_REQUESTS.values():
        wire_types.extend((params, result))
    _, components = msgspec.json.schema_components(
        list(dict.fromkeys(wire_types)), ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cellbox wire protocol",
        "description": f"cellbox protocol version {types.PROTOCOL_VERSION}; generated from cellbox.types.",
        "protocolVersion": types.PROTOCOL_VERSION,
        "requests": {
            name: {"params": _ref(params), "result": _ref(result)}
            for name, (params, result) in methods.REQUESTS.items()
        },
        "notifications": {name: {"params": _ref(params)} for name, params in methods.NOTIFICATIONS.items()},
        "clientRequests": {
            name: {"params": _ref(params), "result": _ref(result)}
            for name, (params, result) in methods.CLIENT_REQUESTS.items()
        },
        "$defs": dict(sorted(components.items())),
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write"]:
        SCHEMA_PATH.write_text(render())
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
