"""A tiny Llama taught to think as Qwen3 does: with thinking on it answers the question
with a ``<think>`` block then the answer; with ``enable_thinking: false`` (the template puts
an empty think block in the prompt, as Qwen3's does) it answers at once.

The prompts are rendered by the gateway's own code with a compact Qwen3-style template, so
what the engine generates goes through the real reasoning parser as real tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.models import build_llama
from harness.tool_model import teach

# Qwen3's chat template, reduced to what it does with thinking (its last lines verbatim)
THINK_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QUESTION = "What is 2 + 2?"
REASONING = "\nTwo and two make four.\n"  # as generated between the tags
ANSWER = "The answer is 4."
THOUGHT = f"<think>{REASONING}</think>\n\n{ANSWER}"  # Qwen3's output with thinking on


def messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTION}]


def _prompt_ids(tokenizer: Any, thinking: bool) -> list[int]:
    from loraplex.gateway.prompts import ServedModel, _render_chat
    from loraplex.gateway.schemas import ChatCompletionRequest

    extra = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages(), **extra})
    return _render_chat(ServedModel("m", tokenizer, 512), body)


def build_think_llama(path: Path, *, max_steps: int = 600) -> Path:
    from transformers import AutoTokenizer

    build_llama(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = tokenizer.eos_token_id
    pairs = [
        (_prompt_ids(tokenizer, True), [*tokenizer.encode(THOUGHT), eos]),
        (_prompt_ids(tokenizer, False), [*tokenizer.encode(ANSWER), eos]),
    ]
    teach(path, pairs, max_steps=max_steps, what="to think")
    return path
