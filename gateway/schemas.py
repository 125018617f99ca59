"""OpenAI request and response shapes.

Requests are strict and forbid unknown fields, so an unsupported parameter is a 400 that
names it instead of being silently ignored. The
bounds on each field (seed, stop, text, counts) live in ``gateway.request_fields``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.gateway.request_fields import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    VALID_UNICODE,
    LogitBias,
    MaxTokens,
    Name,
    Penalty,
    Seed,
    Stop,
    StopTokenIds,
    Temperature,
    TemplateKwargs,
    Text,
    TokenIds,
    TopP,
)
from loraplex.gateway.tool_schemas import ToolCall, ToolCallDelta, ToolCallsIn, ToolChoice, Tools

_REQUEST = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One message of the history. Which fields each role needs (content, except for an
    assistant message with ``tool_calls``; ``tool_call_id`` on a tool result) is checked by
    ``gateway.chat_messages.check_messages``, which names the field."""

    model_config = _REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        Text | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)] | None
    ) = None
    name: Name | None = None
    tool_calls: ToolCallsIn | None = None  # assistant messages
    tool_call_id: Name | None = None  # tool messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def text_length(self) -> int:
        """Characters of ``text()`` and of the calls' arguments, without joining them."""
        calls = sum(len(c.function.arguments) for c in self.tool_calls or ())
        if self.content is None:
            return calls
        if isinstance(self.content, str):
            return len(self.content) + calls
        return sum(len(part.text) for part in self.content) + calls


class ResponseFormatText(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = _REQUEST
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    model_config = _REQUEST
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class _SamplingFields(BaseModel):
    """Parameters shared by chat and text completions."""

    model_config = _REQUEST
    model: Name
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, Field(max_length=256), VALID_UNICODE] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: LogitBias | None = None
    # vLLM's extra sampling parameters (``extra_body``)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    top_k: Annotated[int, Field(ge=-1, lt=2**31)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool = True

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None  # gateway.structured
    # vLLM's: extra variables for the model's chat template (Qwen3's enable_thinking)
    chat_template_kwargs: TemplateKwargs | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PromptText = Annotated[str, Field(min_length=1), VALID_UNICODE]
MAX_PROMPTS = 128  # prompts in one completions request


class CompletionRequest(_SamplingFields):
    prompt: (
        PromptText
        | TokenIds
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None
    suffix: Text | None = None  # refused with a clear 400: no fill-in-the-middle here

    def token_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, one or several (each a text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


# ---- responses -------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


def _absent_if_none(value: object) -> bool:
    return value is None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # vLLM's field: a thinking model's reasoning (gateway.reasoning); left out when None
    reasoning_content: str | None = Field(default=None, exclude_if=_absent_if_none)
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(default=None, exclude_if=_absent_if_none)
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Also the streaming chunk shape: OpenAI streams ``text_completion`` objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
