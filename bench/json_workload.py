"""The JSON-schema workload's schemas, shared by `bench engine --workload json` and `bench serve
--workload json` (no torch here: the serve bench is a client)."""

from __future__ import annotations

from typing import Any

# A typical structured-output schema: an object with strings, a bounded integer, an enum, a
# nested object and a list (what `compile_ms` is measured on).
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "email": {"type": "string", "maxLength": 40},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}


def long_schema(output_tokens: int) -> dict[str, Any]:
    """A list of typical objects that cannot be complete within `output_tokens` tokens, so a
    guided output is exactly as long as an unguided one held there by `ignore_eos`."""
    # Under 40 tokens per object: output_tokens // 8 objects are never done in time.
    return {"type": "array", "items": TYPICAL_SCHEMA, "minItems": max(2, output_tokens // 8)}
