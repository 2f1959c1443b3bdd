"""OpenAI request bodies (pydantic): unknown fields are refused by name, like OpenAI does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.proto import pdserve_pb2
from pdserve.proto.sampling_fields import SAMPLING_FIELDS

# The router's wire types (int32 / int64 / float): a value they cannot hold is the client's
# mistake, refused here with a 400, not a failure to build the gRPC message.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Float = Annotated[float, Field(allow_inf_nan=False)]


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
        """The router's `SamplingParams` for this request."""
        return pdserve_pb2.SamplingParams(**self.sampling_values(max_tokens, logprobs))


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[TokenId] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False


class ContentPart(BaseModel):
    """One part of a message's content; only text parts reach the model."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
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
