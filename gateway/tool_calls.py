"""Tool calls: the grammar that forces them, and reading them out of generated text as it streams.

Three ways a chat request's output holds tool calls (`ToolCallMode`):
- `named` (`tool_choice` names a function): decoding is constrained by the function's
  parameters schema, so the whole output is its arguments object.
- `required`: constrained to a JSON list of `{"name": ..., "arguments": {...}}` objects, one of
  the tools each (one item at most unless `parallel_tool_calls`).
- `auto`: free text in the ERNIE 4.5 format, where the model writes each call as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (what FastDeploy's ERNIE parsers read).

`ToolCallReader.read(text, final)` parses the text so far; what it returns only grows as text is
added (content held back while it may still open a tag, arguments up to what is written), so a
stream sends the differences (`ToolCallStream`) and reassembles to exactly the non-streamed answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolCallMode = Literal["named", "required", "auto"]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_DECODER = json.JSONDecoder()
# A call's opening up to its arguments: the constrained layout, or the model's own spacing (auto).
_STRICT_OPENING = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_LOOSE_OPENING = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of `tool_choice: "required"`'s output: a list of calls of the given tools."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": t.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class ParsedCall:
    """A tool call as far as it is written: its name and its arguments' JSON text so far."""

    name: str
    arguments: str
    complete: bool = False


@dataclass
class ParsedOutput:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


def _arguments(text: str, start: int) -> tuple[str, int | None]:
    """The arguments' JSON text from `start` and where it ends (None: not complete yet)."""
    try:
        _, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return text[start:], None
    return text[start:end], end


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallReader:
    """Parses one choice's output text for tool calls in one `ToolCallMode`."""

    def __init__(self, mode: ToolCallMode, function: str | None = None) -> None:
        self.mode = mode
        self.function = function  # the named function

    def read(self, text: str, final: bool) -> ParsedOutput:
        if self.mode == "named":
            complete = final or _arguments(text, 0)[1] is not None
            return ParsedOutput("", [ParsedCall(self.function or "", text, complete)])
        if self.mode == "required":
            return ParsedOutput("", self._list(text))
        return self._tagged(text, final)

    def _list(self, text: str) -> list[ParsedCall]:
        calls, pos = [], 0
        while (m := _STRICT_OPENING.search(text, pos)) is not None:
            args, end = _arguments(text, m.end())
            calls.append(ParsedCall(json.loads(f'"{m.group(1)}"'), args, end is not None))
            if end is None:
                break
            pos = end
        return calls

    def _tagged(self, text: str, final: bool) -> ParsedOutput:
        out, pos = ParsedOutput(), 0
        while True:
            start = text.find(TOOL_CALL_START, pos)
            if start < 0:
                rest = text[pos:]
                out.content += rest if final else rest[: len(rest) - _partial_tag(rest, TOOL_CALL_START)]
                return out
            out.content += text[pos:start]
            body = start + len(TOOL_CALL_START)
            close = text.find(TOOL_CALL_END, body)
            call = self._tagged_call(text[body:] if close < 0 else text[body:close], close >= 0)
            if call is None:
                if close < 0:  # not readable yet, or ever: its text is content once the output ends
                    out.content += text[start:] if final else ""
                    return out
                out.content += text[start : close + len(TOOL_CALL_END)]
            else:
                out.calls.append(call)
                if close < 0:
                    return out
            pos = close + len(TOOL_CALL_END)

    def _tagged_call(self, body: str, closed: bool) -> ParsedCall | None:
        m = _LOOSE_OPENING.match(body)
        if m is not None:
            args, end = _arguments(body, m.end())
            return ParsedCall(json.loads(f'"{m.group(1)}"'), args, end is not None and closed)
        if not closed:
            return None
        try:  # keys in another order: read whole once the block is closed
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
            args = obj["arguments"]
            return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args), True)
        return None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's tool calls as OpenAI streams them: a call's id and name first, then argument deltas."""

    def __init__(self, reader: ToolCallReader) -> None:
        self.reader = reader
        self._text = ""
        self._content_sent = 0
        self._args_sent: list[int] = []
        self.ids: list[str] = []

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) for `text` added to the choice's output."""
        self._text += text
        parsed = self.reader.read(self._text, final)
        content = parsed.content[self._content_sent :]
        self._content_sent = len(parsed.content)
        deltas = []
        for i, call in enumerate(parsed.calls):
            if i == len(self.ids):
                self.ids.append(call_id())
                self._args_sent.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})  # fmt: skip
            if len(call.arguments) > self._args_sent[i]:
                deltas.append({"index": i, "function": {"arguments": call.arguments[self._args_sent[i] :]}})
                self._args_sent[i] = len(call.arguments)
        return content, deltas


def full_tool_calls(reader: ToolCallReader, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole output, in a non-streamed message's shape."""
    parsed = reader.read(text, final=True)
    calls = [
        {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in parsed.calls
    ]
    return parsed.content, calls
