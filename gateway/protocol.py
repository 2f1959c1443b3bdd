"""OpenAI request bodies (pydantic): unknown fields are refused by name, like OpenAI does."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from pdserve.engine.sampling_params import GuidedDecoding, SamplingParams, SamplingParamsError
from pdserve.proto import pdserve_pb2
from pdserve.proto.sampling_fields import SAMPLING_FIELDS

# The router's wire types (int32 / int64 / float): a value they cannot hold is the client's
# mistake, refused here with a 400, not a failure to build the gRPC message.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Float = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def prompt_kind(value: Any) -> str | None:
    """Which form of `prompt` a value has, judged by its shape (its first item for a list).

    Validating only against that form reports that form's error, not every form's.
    """
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, str):
        return "texts"
    if isinstance(first, list):
        return "token_id_lists"
    return "token_ids"


# One prompt (text or token ids) or a batch of them, as OpenAI takes it.
Prompt = Annotated[
    Annotated[str, Field(min_length=1), Tag("text")]
    | Annotated[TokenIds, Tag("token_ids")]
    | Annotated[list[str], Field(min_length=1), Tag("texts")]
    | Annotated[list[TokenIds], Field(min_length=1), Tag("token_id_lists")],
    Discriminator(
        prompt_kind,
        custom_error_type="prompt_form",
        custom_error_message="must be a string, a list of token ids, or a list of either",
    ),
]
# The tags above, which pydantic puts in an error's location: not part of the field's path.
PROMPT_KINDS = frozenset({"text", "token_ids", "texts", "token_id_lists"})


# The validation error type of a string holding a lone surrogate; its context names the field.
LONE_SURROGATE = "lone_surrogate"


def _escaped(key: str) -> str:
    # A key is part of the error's text, which must itself be valid UTF-8.
    return key.encode("utf-8", "backslashreplace").decode()


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The path ("messages.0.content") of the first string in a parsed JSON value that holds a lone
    surrogate, else None.

    JSON may escape half of a UTF-16 pair ("\\ud800"); Python's parser keeps it, and it is not
    text: the tokenizer cannot encode it, and neither can a response that echoes it.
    """
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{_escaped(str(key))}" if path else _escaped(str(key))
            if lone_surrogate_at(str(key), here) is not None:
                return here
            if (found := lone_surrogate_at(item, here)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (
                isinstance(item, (str, dict, list))
                and (found := lone_surrogate_at(item, f"{path}.{i}")) is not None
            ):
                return found
    return None


# Wire sampling fields each endpoint decides itself: max_tokens from the context window, logprobs
# from its own form of the option (a count in completions, a switch and a count in chat), guided
# decoding from `response_format`, vLLM's `guided_*` fields or (chat) the tools.
ENDPOINT_SAMPLING_FIELDS = ("max_tokens", "logprobs", "guided_decoding")
# The body fields that ask for guided decoding (at most one per request), and the kind each gives.
GUIDED_FIELDS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# Wire sampling fields no request body offers: they keep the engine's defaults.
UNOFFERED_SAMPLING_FIELDS = ("include_stop_str_in_output", "skip_special_tokens")
# Request fields that are not sampling fields: the gateway itself acts on them.
REQUEST_FIELDS = ("model", "n", "stream", "stream_options", "user", "response_format", *GUIDED_FIELDS)
OFFERED_SAMPLING_FIELDS = tuple(
    name for name in SAMPLING_FIELDS if name not in ENDPOINT_SAMPLING_FIELDS + UNOFFERED_SAMPLING_FIELDS
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the output must validate against."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs the json_schema field")
        return self


class UnicodeBody(BaseModel):
    """A request body whose every string must be text (see `lone_surrogate_at`)."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """Refuses a body with a lone surrogate in any string, naming where."""
        if isinstance(data, dict) and (param := lone_surrogate_at(data)) is not None:
            raise PydanticCustomError(
                LONE_SURROGATE,
                "{param} contains a lone UTF-16 surrogate (half of a \\ud800-\\udfff pair), which is not "
                "text; send valid Unicode",
                {"param": param},
            )
        return data


class SamplingFields(UnicodeBody):
    """Fields shared by /v1/completions and /v1/chat/completions (vLLM's extensions included)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int32 | None = None
    min_p: Float | None = None
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    seed: int | None = Field(default=None, ge=-(2**63), le=INT64_MAX)
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None

    def guided_decoding(self) -> tuple[GuidedDecoding, str] | None:
        """The guided decoding the body asks for and the field that asked (None: free output).

        Raises ValueError when two fields ask for it.
        """
        asked = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            asked.insert(0, "response_format")
        if len(asked) > 1:
            raise ValueError(f"{asked[1]}: only one of response_format and guided_* may constrain the output, "
                             f"and {asked[0]} does already")  # fmt: skip
        if not asked:
            return None
        name = asked[0]
        if name == "response_format":
            assert fmt is not None
            if fmt.type == "json_object":
                return GuidedDecoding("json_object"), "response_format"
            assert fmt.json_schema is not None
            schema = fmt.json_schema.schema_ or {"type": "object"}
            return GuidedDecoding("json_schema", json.dumps(schema)), "response_format.json_schema.schema"
        value = getattr(self, name)
        text = value if isinstance(value, str) else json.dumps(value)
        return GuidedDecoding(GUIDED_FIELDS[name], text), name

    def sampling_values(
        self, max_tokens: int, logprobs: int | None, guided: GuidedDecoding | None = None
    ) -> dict[str, Any]:
        """The sampling fields this request sets, by their wire names (unset ones left out).

        `max_tokens`, `logprobs` and `guided` are as the endpoint decided them.
        """
        values = {name: getattr(self, name) for name in OFFERED_SAMPLING_FIELDS}
        if isinstance(self.stop, str):
            values["stop"] = [self.stop]
        if self.logit_bias is not None:
            values["logit_bias"] = _token_biases(self.logit_bias) or None
        values.update(max_tokens=max_tokens, logprobs=logprobs, guided_decoding=guided)
        return {name: value for name, value in values.items() if value is not None}

    def to_sampling_proto(
        self, max_tokens: int, logprobs: int | None, guided: GuidedDecoding | None = None
    ) -> pdserve_pb2.SamplingParams:
        """The router's `SamplingParams` for this request.

        Checked first by the engine's own rules, so that a bad value is refused before a stream
        starts: raises `SamplingParamsError`, whose `field` names it.
        """
        values = self.sampling_values(max_tokens, logprobs, guided)
        SamplingParams(**values)
        if guided is not None:
            values["guided_decoding"] = pdserve_pb2.GuidedDecoding(kind=guided.kind, value=guided.value)
        return pdserve_pb2.SamplingParams(**values)


def _token_biases(biases: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer keys."""
    out = {}
    for key, bias in biases.items():
        if not (key.isascii() and key.isdigit()) or int(key) > INT32_MAX:
            raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        out[int(key)] = bias
    return out


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @property
    def is_batch(self) -> bool:
        """Whether `prompt` is a list of prompts."""
        return isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or many, each text or token ids."""
        return list(self.prompt) if self.is_batch else [self.prompt]  # type: ignore[list-item]


class ContentPart(BaseModel):
    """One part of a message's content; only text parts reach the model."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """The function an assistant message called, its arguments as JSON text (as OpenAI sends them)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message in the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def unusable_part(self) -> tuple[str, str] | None:
        """Where in this message, and what, is content a text-only model cannot read (None if none).

        Such content is refused rather than dropped: the answer would silently ignore it.
        """
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                return f"content.{j}", f"a {part.type!r} content part"
        return None

    def text(self) -> str:
        """The message's text (its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it (tool calls with their arguments as objects)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments_value(arguments: str) -> Any:
    # Templates write arguments with `tojson`; text that is not JSON stays text.
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class FunctionDefinition(BaseModel):
    """A function the model may call: its name and its parameters' JSON schema."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` naming one function, which the answer must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions, with ERNIE's `enable_thinking` switch."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def enable_thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`, else `metadata.enable_thinking`, else None."""
        for source in (self.chat_template_kwargs, self.metadata):
            if source and "enable_thinking" in source:
                value = source["enable_thinking"]
                return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return None


class BodyFieldError(ValueError):
    """A body that validates but asks for what this server does not do; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class ResponseTextFormat(BaseModel):
    """The Responses API's `text.format`: chat's `response_format` with the schema's fields inline."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> ResponseFormat:
        """The same format as chat's `response_format`."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        if self.name is None:
            raise BodyFieldError("text.format.name", "a json_schema format needs a name")
        schema = JsonSchemaFormat(name=self.name, description=self.description, schema=self.schema_,
                                  strict=self.strict)  # fmt: skip
        return ResponseFormat(type="json_schema", json_schema=schema)


class ResponseText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: ResponseTextFormat | None = None


class ResponseInputItem(BaseModel):
    """One item of the Responses API's `input` list; only messages (of text) are served."""

    # Items fed back from an earlier response's output carry its ids and status: they are ignored.
    model_config = ConfigDict(extra="allow")

    type: str = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None


# The Responses API's fields pdserve does not serve, each with what to do instead. A request that
# sets one is refused by name rather than answered as if it were absent; an empty value is allowed.
RESPONSES_UNSERVED = {
    "tools": "tool calls are served on /v1/chat/completions",
    "tool_choice": "tool calls are served on /v1/chat/completions",
    "max_tool_calls": "tool calls are served on /v1/chat/completions",
    "previous_response_id": "responses are not stored; send the whole conversation as input",
    "conversation": "responses are not stored; send the whole conversation as input",
    "prompt": "stored prompts are not served; send input (and instructions)",
    "reasoning": "reasoning settings are not served; the chat template decides about thinking",
    "include": "no extra output data is served",
    "background": "background responses are not served; stream instead",
    "top_logprobs": "logprobs are served on /v1/chat/completions",
}
# Values that mean "not used" (tool_choice "none" and "auto" without tools change nothing).
UNUSED_VALUES = (None, [], {}, False, "none", "auto")


class ResponsesRequest(UnicodeBody):
    """POST /v1/responses, the basic text case: served as a chat completion of the same messages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[ResponseInputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: Float | None = None
    top_p: Float | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: ResponseText | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None  # means nothing without tools
    truncation: Literal["disabled"] | None = None
    tools: Any = None
    tool_choice: Any = None
    max_tool_calls: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    reasoning: Any = None
    include: Any = None
    background: Any = None
    top_logprobs: Any = None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion that answers this request: `instructions` as the first (system)
        message, then the input's messages. Raises BodyFieldError for what is not served."""
        for name, instead in RESPONSES_UNSERVED.items():
            if getattr(self, name) not in UNUSED_VALUES:
                raise BodyFieldError(
                    name, f"not supported on /v1/responses, which serves text only; {instead}"
                )
        if self.store:
            raise BodyFieldError("store", "responses are not stored; send store: false or leave it out")
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += [_chat_message(item, f"input.{i}") for i, item in enumerate(self.input)]
        fmt = self.text.format if self.text is not None else None
        return ChatCompletionRequest(
            model=self.model, messages=messages, max_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, stream=self.stream, user=self.user,
            response_format=fmt.response_format() if fmt is not None else None,
        )  # fmt: skip


def _chat_message(item: ResponseInputItem, where: str) -> ChatMessage:
    """Input item `where` as a chat message of its text; BodyFieldError for any other item."""
    if item.type != "message":
        raise BodyFieldError(f"{where}.type", f"{item.type!r} items are not supported; only messages are")
    if item.role is None:
        raise BodyFieldError(f"{where}.role", "a message needs a role (user, system, developer or assistant)")
    parts = item.content if isinstance(item.content, list) else []
    for j, part in enumerate(parts):
        if part.type not in ("input_text", "output_text"):
            raise BodyFieldError(f"{where}.content.{j}", f"a {part.type!r} part cannot be used; this model "
                                                         "reads text only")  # fmt: skip
    text = "".join(p.text or "" for p in parts) if parts else item.content
    return ChatMessage(role=item.role, content=text)
