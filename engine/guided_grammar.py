"""A request's guided decoding as llguidance grammar text, and its check, without a tokenizer.

Torch-free, so the gateway refuses a bad schema, regex or grammar with a 400 before any worker
sees it, by the same rules the engine compiles with. JSON output is laid out the one way
`json.dumps` writes it (", " and ": ", no newlines): a small model given free whitespace can
spend its whole budget on blank lines, and one layout lets a streaming parser read it.
"""

from __future__ import annotations

import json

import llguidance

from pdserve.engine.sampling_params import GuidedDecoding

# llguidance's JSON options (its `x-guidance` keys) for every schema pdserve compiles.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any JSON object: what OpenAI's `response_format: {"type": "json_object"}` asks for.
ANY_OBJECT_SCHEMA = {"type": "object"}


class GuidedDecodingError(ValueError):
    """The guided decoding cannot be compiled; the message says why (llguidance's words)."""


def grammar_text(guided: GuidedDecoding) -> str:
    """llguidance's grammar text for `guided` (its cache key, too); GuidedDecodingError if malformed."""
    try:
        return _grammar_text(guided)
    except GuidedDecodingError:
        raise
    except Exception as e:  # llguidance's own errors on text it cannot read (ValueError, RuntimeError)
        raise GuidedDecodingError(str(e).strip() or type(e).__name__) from e


def _grammar_text(guided: GuidedDecoding) -> str:
    if guided.kind in ("json_schema", "json_object"):
        schema = _schema(guided.value) if guided.kind == "json_schema" else ANY_OBJECT_SCHEMA
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    if guided.kind == "choice":
        choices = _json(guided.value, "the choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GuidedDecodingError("the choices must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", guided.value)
    if guided.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(guided.value)
    if guided.kind == "grammar":
        if not guided.value.strip():
            raise GuidedDecodingError("the grammar is empty")
        return llguidance.grammar_from("grammar", guided.value)
    raise GuidedDecodingError(f"unknown guided decoding kind {guided.kind!r}")


def check_guided(guided: GuidedDecoding) -> str:
    """`grammar_text(guided)` once llguidance has checked it; GuidedDecodingError naming the problem."""
    text = grammar_text(guided)
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    except Exception as e:
        raise GuidedDecodingError(str(e).strip() or type(e).__name__) from e
    if is_error:
        raise GuidedDecodingError("; ".join(m.strip() for m in messages) or "the grammar is invalid")
    return text


def _json(value: str, what: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise GuidedDecodingError(f"{what} are not valid JSON: {e}") from e


def _schema(value: str) -> dict:
    schema = _json(value, "the schema's contents")
    if not isinstance(schema, dict):
        raise GuidedDecodingError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return schema
