"""A prompt that cannot fit the context is refused before it is tokenized.

Tokenizing costs time and memory in proportion to the text (a 3.9 MB prompt took over a
GB while tokenizing), so the size is bounded by what the context can hold first:

- text (a completion prompt, the sum of the chat messages' contents): at most
  ``max_model_len * CHARS_PER_TOKEN`` characters. English runs at about 4.5 characters a
  token with SmolLM2's tokenizer and code at about 3.5; only runs of whitespace reach
  64. 32 is generous: a prompt refused here holds more than 32 characters for every token
  the model can attend to, so it could not have fit unless it were mostly long runs of
  spaces (which fit as token ids).
- token ids: at most ``max_model_len - 1`` of them (the completion needs one token).
- messages: fewer than ``max_model_len`` (each renders at least one token).

The request body limit (``LORAPLEX_MAX_BODY_BYTES``) bounds all of this again.
"""

from __future__ import annotations

from loraplex.gateway.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.tenancy.errors import InvalidInput

CHARS_PER_TOKEN = 32
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def _too_long(max_model_len: int, what: str, param: str) -> InvalidInput:
    return InvalidInput(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"{what}. Please reduce the length of the {param}.",
        param=param,
        code=CONTEXT_LENGTH_EXCEEDED,
    )


def check_prompt_size(max_model_len: int, body: ChatCompletionRequest | CompletionRequest) -> None:
    """Raises ``context_length_exceeded`` for a prompt that cannot fit; cheap (no copies)."""
    max_chars = max_model_len * CHARS_PER_TOKEN
    if isinstance(body, ChatCompletionRequest):
        count = len(body.messages)
        if count >= max_model_len:
            raise _too_long(max_model_len, f"messages number {count}", "messages")
        chars = sum(m.text_length() for m in body.messages)
        for tool in body.tools or ():
            f = tool.function
            chars += len(f.description or "") + len(str(f.parameters or ""))
        if chars > max_chars:
            what = f"messages have {chars} characters, more than {max_chars} can fit"
            raise _too_long(max_model_len, what, "messages")
        return
    for prompt in body.prompts():
        if isinstance(prompt, list):
            if len(prompt) >= max_model_len:
                raise _too_long(max_model_len, f"prompt has {len(prompt)} tokens", "prompt")
        elif len(prompt) > max_chars:
            what = f"prompt has {len(prompt)} characters, more than {max_chars} can fit"
            raise _too_long(max_model_len, what, "prompt")
