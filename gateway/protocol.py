"""OpenAI request bodies (pydantic): unknown fields are refused by name, like OpenAI does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from pdserve.engine.sampling_params import SamplingParams
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
# from its own form of the option (a count in completions, a switch and a count in chat).
ENDPOINT_SAMPLING_FIELDS = ("max_tokens", "logprobs")
# Wire sampling fields no request body offers: they keep the engine's defaults.
UNOFFERED_SAMPLING_FIELDS = ("include_stop_str_in_output", "skip_special_tokens")
# Request fields that are not sampling fields: the gateway itself acts on them.
REQUEST_FIELDS = ("model", "n", "stream", "stream_options", "user")
OFFERED_SAMPLING_FIELDS = tuple(
    name for name in SAMPLING_FIELDS if name not in ENDPOINT_SAMPLING_FIELDS + UNOFFERED_SAMPLING_FIELDS
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingFields(BaseModel):
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

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """Refuses a body with a lone surrogate in any string, naming where (see `lone_surrogate_at`)."""
        if isinstance(data, dict) and (param := lone_surrogate_at(data)) is not None:
            raise PydanticCustomError(
                LONE_SURROGATE,
                "{param} contains a lone UTF-16 surrogate (half of a \\ud800-\\udfff pair), which is not "
                "text; send valid Unicode",
                {"param": param},
            )
        return data

    def sampling_values(self, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        """The sampling fields this request sets, by their wire names (unset ones left out).

        `max_tokens` and `logprobs` are as the endpoint decided them.
        """
        values = {name: getattr(self, name) for name in OFFERED_SAMPLING_FIELDS}
        if isinstance(self.stop, str):
            values["stop"] = [self.stop]
        values.update(max_tokens=max_tokens, logprobs=logprobs)
        return {name: value for name, value in values.items() if value is not None}

    def to_sampling_proto(self, max_tokens: int, logprobs: int | None) -> pdserve_pb2.SamplingParams:
        """The router's `SamplingParams` for this request.

        Checked first by the engine's own rules, so that a bad value is refused before a stream
        starts: raises `SamplingParamsError`, whose `field` names it.
        """
        values = self.sampling_values(max_tokens, logprobs)
        SamplingParams(**values)
        return pdserve_pb2.SamplingParams(**values)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False

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


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None

    def unusable_part(self) -> tuple[str, str] | None:
        """Where in this message, and what, is content a text-only model cannot read (None if none).

        Such content is refused rather than dropped: the answer would silently ignore it.
        """
        if self.tool_calls:
            return "tool_calls", "tool calls"
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                return f"content.{j}", f"a {part.type!r} content part"
        return None

    def text(self) -> str:
        """The message's text (its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions, with ERNIE's `enable_thinking` switch."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def enable_thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`, else `metadata.enable_thinking`, else None."""
        for source in (self.chat_template_kwargs, self.metadata):
            if source and "enable_thinking" in source:
                value = source["enable_thinking"]
                return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return None
