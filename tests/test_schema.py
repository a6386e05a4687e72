"""The checked-in JSON Schema is what the msgspec types generate, and it describes real messages."""

from __future__ import annotations

import json

import jsonschema
import msgspec

from cellbox import methods, schema
from cellbox import types as t


def test_checked_in_schema_is_up_to_date() -> None:
    assert schema.SCHEMA_PATH.read_text() == schema.render(), (
        "protocol/schema.json is stale: run `python -m cellbox.schema --write`"
    )


def test_every_method_has_params_and_result_in_the_schema() -> None:
    generated = schema.build_schema()
    assert set(generated["requests"]) == set(methods.REQUESTS)
    assert set(generated["notifications"]) == set(methods.NOTIFICATIONS)
    for name, (params, _) in methods.REQUESTS.items():
        assert generated["requests"][name]["params"] == {"$ref": f"#/$defs/{params.__name__}"}


def _validate(definition: str, instance: object) -> None:
    document = schema.build_schema()
    jsonschema.validate(instance, {"$ref": f"#/$defs/{definition}", "$defs": document["$defs"]})


def test_schema_accepts_encoded_types_and_rejects_bad_ones() -> None:
    result = t.ExecuteResult(
        execution_id="e1",
        status="error",
        text="boom\n",
        outputs=[t.Output({"text/plain": "1"}, {}, None)],
        truncated=False,
        error=t.ErrorInfo("ValueError", "bad", ["Traceback"]),
    )
    encoded = json.loads(msgspec.json.encode(result))
    assert encoded["executionId"] == "e1" and "executionCount" not in encoded
    _validate("ExecuteResult", encoded)
    bad = dict(encoded, status="exploded")
    try:
        _validate("ExecuteResult", bad)
    except jsonschema.ValidationError as exc:
        assert "exploded" in str(exc)
    else:
        raise AssertionError("a bad status passed the schema")


def test_params_decode_from_camel_case_and_name_bad_fields() -> None:
    params = msgspec.convert({"kernelId": "k", "code": "1", "executionId": "x"}, t.ExecuteParams)
    assert (params.kernel_id, params.timeout, params.execution_id) == ("k", 120.0, "x")
    try:
        msgspec.convert({"sandboxId": "s", "modules": ["ok", "1bad"]}, t.GetSkillSourcesParams)
    except msgspec.ValidationError as exc:
        assert "$.modules[1]" in str(exc)
    else:
        raise AssertionError("a bad module name was accepted")
