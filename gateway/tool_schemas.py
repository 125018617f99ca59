"""The tool-calling shapes of the chat API: ``tools``, ``tool_choice``, the calls an assistant
message carries (in the history and in responses) and their streaming deltas."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from loraplex.gateway.request_fields import VALID_UNICODE, Text

_REQUEST = ConfigDict(extra="forbid", strict=True)

MAX_TOOLS = 128  # OpenAI's limit on functions per request
MAX_TOOL_CALLS = 128  # calls one assistant message may carry in the history


def _json_text_valid(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema is rendered into the prompt as JSON text: it must be valid Unicode."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError -> 400
    return value


FunctionName = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"),
]
JsonSchema = Annotated[dict[str, Any], AfterValidator(_json_text_valid)]


class FunctionDefinition(BaseModel):
    model_config = _REQUEST
    name: FunctionName
    description: Annotated[str, Field(max_length=100_000), VALID_UNICODE] | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None  # enforced by constrained decoding where the engine has it


class ToolDefinition(BaseModel):
    model_config = _REQUEST
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    model_config = _REQUEST
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = _REQUEST
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)]


class FunctionCallIn(BaseModel):
    model_config = _REQUEST
    name: Annotated[str, Field(min_length=1, max_length=256), VALID_UNICODE]
    arguments: Text  # JSON text, as the API returned it


class ToolCallIn(BaseModel):
    """A call of an assistant message in the history."""

    model_config = _REQUEST
    id: Annotated[str, Field(max_length=256), VALID_UNICODE]
    type: Literal["function"]
    function: FunctionCallIn


ToolCallsIn = Annotated[list[ToolCallIn], Field(max_length=MAX_TOOL_CALLS)]


# ---- responses ---------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
