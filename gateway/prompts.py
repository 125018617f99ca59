"""From an OpenAI request to what the engine runs: prompt token ids and sampling values.

The gateway tokenizes (with the engine's own tokenizer and chat template) because it must
know the prompt's length before the engine sees it: to refuse a prompt over the context
with a clear 400, to default ``max_tokens`` to what the context leaves, and to reserve
prompt + completion tokens with the limiter.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from loraplex.engine.api import SamplingParams
from loraplex.engine.client import EngineClient
from loraplex.engine.errors import EngineDead
from loraplex.gateway.chat_messages import ToolPlan, check_messages, template_inputs, template_text
from loraplex.gateway.prompt_budget import check_prompt_size
from loraplex.gateway.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.gateway.tool_grammar import tool_grammar
from loraplex.tenancy.errors import InvalidInput, Unavailable


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ServedModel:
    """The base model as the API presents it."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int


def served_model(name: str, engine: EngineClient | None) -> ServedModel:
    """What the gateway needs of the engine: its tokenizer and context length."""
    info = None if engine is None else engine.model_info()
    if engine is None:
        raise Unavailable("This server runs no engine.")
    if info is None:  # 503 engine_unavailable, with Retry-After
        detail = engine.health().detail or "not loaded"
        raise EngineDead(f"The model is not available ({detail}); retry shortly.")
    return ServedModel(name=name, tokenizer=engine.tokenizer(), max_model_len=info.max_model_len)


INLINE_CHARS = 2048  # text up to this is tokenized on the event loop (well under a millisecond)


class ContextLengthExceeded(InvalidInput):
    code = "context_length_exceeded"


def _render_chat(
    model: ServedModel, body: ChatCompletionRequest, plan: ToolPlan | None = None
) -> list[int]:
    """The template's control tokens are recognized, the messages' text never is: with
    ``sanitize_control_tokens`` a control token typed inside a message (``<|im_start|>``)
    is encoded as plain text, so that a user cannot forge a system or assistant turn.
    A conversation without such text gets the ids of its whole rendering, as before.
    (Encoding the contents apart with ``split_special_tokens=True`` is no alternative: it
    flips a flag on the shared tokenizer, a race between requests tokenized at once.)
    Tools, tool calls and tool results: ``gateway.chat_messages``. A template that refuses a
    conversation with a system message gets it again with the system text folded into the
    first user turn (:func:`fold_system`); if that fails too, the first refusal is the 400."""
    messages, tools = template_inputs(body, plan, template_text(model.tokenizer))

    def render(conversation: list[dict[str, Any]]) -> Any:
        return model.tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **(body.chat_template_kwargs or {}),  # keys checked (request_fields)
        )

    try:
        ids = render(messages)
    except Exception as exc:  # the template itself refuses this conversation
        folded = fold_system(messages)
        ids = None
        if folded is not None:
            try:
                ids = render(folded)
            except Exception:  # the first refusal says what is wrong
                ids = None
        if ids is None:
            raise InvalidInput(f"messages: {exc}", param="messages") from None
    return [int(i) for i in ids]  # the template holds every special token the model expects


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """For a template that refuses the system role (Gemma 2's raises "System role not
    supported"): the leading system text at the head of the first user turn, as Gemma 3's
    template writes it itself (``system + "\n\n" + user``). None: nothing to fold (no
    leading system message, or no user turn after it)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n == 0 or n == len(messages) or messages[n]["role"] != "user":
        return None
    system = "\n\n".join(str(m["content"]) for m in messages[:n])
    first = messages[n]
    return [{**first, "content": f"{system}\n\n{first['content']}"}, *messages[n + 1 :]]


def _encode_prompt(model: ServedModel, prompt: str | list[int]) -> list[int]:
    """A text prompt is raw, as in OpenAI's API: control tokens written in it are the
    model's (the caller writes the whole prompt, and token ids could name them anyway)."""
    if isinstance(prompt, list):
        return list(prompt)  # the engine checks each id against its vocabulary
    return list(model.tokenizer.encode(prompt))


async def prompt_ids(
    model: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    plan: ToolPlan | None = None,
    prompt: str | list[int] | None = None,
) -> list[int]:
    """Token ids as given; short text tokenized in line (a thread hop costs more than the
    tokenizer there); a long prompt in a worker thread, so it cannot stall the event loop.
    A prompt too large for the context is refused before it is tokenized
    (``gateway.prompt_budget``). ``prompt``: which of a completions request's prompts."""
    check_prompt_size(model.max_model_len, body)
    if isinstance(body, ChatCompletionRequest):
        check_messages(body)
        short = sum(m.text_length() for m in body.messages) <= INLINE_CHARS and not body.tools
        ids = (
            _render_chat(model, body, plan)
            if short
            else await asyncio.to_thread(_render_chat, model, body, plan)
        )
        param = "messages"
    else:
        one = body.prompts()[0] if prompt is None else prompt
        short = not isinstance(one, str) or len(one) <= INLINE_CHARS
        ids = (
            _encode_prompt(model, one)
            if short
            else await asyncio.to_thread(_encode_prompt, model, one)
        )
        param = "prompt"
    if not ids:
        raise InvalidInput("the prompt is empty", param=param)
    if len(ids) >= model.max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"your {param} has {len(ids)} tokens.",
            param=param,
        )
    return ids


def sampling_params(
    model: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    plan: ToolPlan | None = None,
) -> SamplingParams:
    room = model.max_model_len - prompt_len
    limit = body.token_limit()
    if isinstance(body, CompletionRequest) and body.max_tokens is None and limit is not None:
        limit = min(limit, room)  # the default (16) fits what the context leaves
    if limit is not None and limit > room:
        field = "max_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            field = "max_completion_tokens"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"you requested {prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} "
            "for the completion). Please reduce the prompt or the completion length.",
            param=field,
        )
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidInput("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        grammar = tool_grammar(plan, body.response_format)
    else:
        logprobs = body.logprobs
        grammar = None
    bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
    return SamplingParams(
        max_tokens=limit if limit is not None else room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop=body.stop_list(),
        logprobs=logprobs,
        n=body.n,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logit_bias=bias,
        skip_special_tokens=body.skip_special_tokens,
        grammar=grammar,
    )


def check_completion_options(body: CompletionRequest) -> None:
    """The options this server does not do, refused by name."""
    if body.suffix is not None:
        raise InvalidInput(
            "suffix is not supported: the served model has no fill-in-the-middle format",
            param="suffix",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidInput(
            f"best_of must equal n ({body.n}): ranking extra completions is not supported",
            param="best_of",
        )
    if body.echo and body.logprobs is not None:
        raise InvalidInput(
            "echo with logprobs is not supported (the prompt's logprobs are not computed)",
            param="echo",
        )
