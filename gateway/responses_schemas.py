"""The shapes of ``POST /v1/responses`` (OpenAI's Responses API), the subset agent frameworks
use: text and function tools in and out. Requests are strict like chat's (an unknown field
is a 400 naming it); ``gateway.responses`` turns one into a chat request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from loraplex.gateway.request_fields import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    VALID_UNICODE,
    MaxTokens,
    Name,
    Temperature,
    Text,
    TopP,
)
from loraplex.gateway.schemas import JsonSchemaFormat
from loraplex.gateway.tool_schemas import FunctionName, JsonSchema

_REQUEST = ConfigDict(extra="forbid", strict=True)
ItemId = Annotated[str, Field(max_length=256), VALID_UNICODE]
Metadata = Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class InputText(BaseModel):
    model_config = _REQUEST
    type: Literal["input_text", "output_text"]  # an assistant turn's text is output_text
    text: Text
    annotations: list[Any] | None = None  # as the API returned it; not used


class MessageItem(BaseModel):
    """A message of the conversation (``type`` may be left out, as the SDK allows)."""

    model_config = _REQUEST
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | Annotated[list[InputText], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made (from an earlier response's output)."""

    model_config = _REQUEST
    type: Literal["function_call"]
    call_id: ItemId
    name: FunctionName
    arguments: Text
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(BaseModel):
    """The result of a call, for the model to read."""

    model_config = _REQUEST
    type: Literal["function_call_output"]
    call_id: ItemId
    output: Text
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "")
    return kind if kind in ("message", "function_call", "function_call_output") else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(BaseModel):
    """A function tool, flat as the Responses API writes it (chat nests it in ``function``)."""

    model_config = _REQUEST
    type: Literal["function"]
    name: FunctionName
    description: Annotated[str, Field(max_length=100_000), VALID_UNICODE] | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    model_config = _REQUEST
    type: Literal["function"]
    name: FunctionName


class FormatText(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]


class FormatJsonObject(BaseModel):
    model_config = _REQUEST
    type: Literal["json_object"]


class FormatJsonSchema(JsonSchemaFormat):
    """``text.format`` of type ``json_schema``: chat's ``json_schema`` fields, flat."""

    type: Literal["json_schema"]


class TextConfig(BaseModel):
    model_config = _REQUEST
    format: Annotated[
        FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")
    ] = Field(default_factory=lambda: FormatText(type="text"))
    verbosity: Literal["medium"] | None = None  # only the default: nothing else is done


class ResponsesRequest(BaseModel):
    model_config = _REQUEST
    model: Name
    input: Text | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    metadata: Metadata | None = None
    user: Annotated[str, Field(max_length=256), VALID_UNICODE] | None = None
    # refused unless off or empty (``gateway.responses.check_unsupported``): no responses
    # are stored here, and nothing else is included in the output
    store: bool | None = None
    previous_response_id: ItemId | None = None
    include: Annotated[list[str], Field(max_length=16)] | None = None
    truncation: Literal["disabled", "auto"] | None = None


# ---- responses ---------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: Literal[False] = False
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None
