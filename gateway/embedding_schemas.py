"""OpenAI's ``/v1/embeddings`` request and response shapes (the other routes' are in
``gateway.schemas``; the same strict rules: unknown fields are a 400 that names them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.gateway.request_fields import VALID_UNICODE, Name, TokenIds

MAX_EMBEDDING_INPUTS = 2048  # inputs in one request (OpenAI's limit)

_REQUEST = ConfigDict(extra="forbid", strict=True)
InputText = Annotated[str, Field(min_length=1), VALID_UNICODE]
EmbeddingInput = (
    InputText
    | Annotated[list[InputText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
)


class EmbeddingRequest(BaseModel):
    model_config = _REQUEST
    model: Name
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None  # only the model's own size
    user: Annotated[str, Field(max_length=256), VALID_UNICODE] | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """Every input as a list: texts, or token-id lists."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if isinstance(x[0], int):
            return [x]  # type: ignore[list-item]
        return x  # type: ignore[return-value]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # floats, or (``encoding_format: base64``) the base64 of little-endian float32 values
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """OpenAI's shape, plus ``id`` (the usage record's request id) and ``created``, as
    vLLM answers too."""

    id: str
    object: Literal["list"] = "list"
    created: int
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
