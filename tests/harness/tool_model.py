"""A tiny Llama taught to call a tool: given the weather question with the ``get_weather``
tool it writes a Hermes ``<tool_call>``; given the tool's result it writes the answer.

A random model never writes a tool call, so the round-trip tests need one that does: the
2-layer model is trained (full fine-tune, a few seconds on a CPU) until greedy decoding of
both prompts gives exactly the two answers. The prompts are rendered by the gateway's own
code with a compact Qwen-style chat template that has a tools section, so what the engine
generates goes through the real parser as real tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.models import build_llama

# ChatML with a tools section in Qwen 2.5's manner (compact: the tiny model's context is 512).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    '{% endfor %}. Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>'
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}"
    "</tool_response><|im_end|>\n"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QUESTION = "What is the weather in Paris?"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ARGUMENTS = {"city": "Paris"}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOL_RESULT = "22 C, sunny"
ANSWER = "It is 22 C and sunny in Paris."


def first_turn() -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTION}]


def second_turn(call_id: str, arguments: str) -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    return [
        *first_turn(),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


def _prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    from loraplex.gateway.chat_messages import plan_tools, template_text
    from loraplex.gateway.prompts import ServedModel, _render_chat
    from loraplex.gateway.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "tools": TOOLS}
    )
    plan = plan_tools(body, template_text(tokenizer), None)
    return _render_chat(ServedModel("m", tokenizer, 512), body, plan)


def build_tool_llama(path: Path, *, max_steps: int = 600) -> Path:
    from transformers import AutoTokenizer

    build_llama(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = tokenizer.eos_token_id
    args = json.dumps(ARGUMENTS)
    pairs = [
        (_prompt_ids(tokenizer, first_turn()), [*tokenizer.encode(CALL_TEXT), eos]),
        (_prompt_ids(tokenizer, second_turn("call_x", args)), [*tokenizer.encode(ANSWER), eos]),
    ]
    teach(path, pairs, max_steps=max_steps, what="its tool call")
    return path


def teach(
    path: Path, pairs: list[tuple[list[int], list[int]]], *, max_steps: int, what: str
) -> None:
    """Fine-tune the Llama in ``path`` (all of it) until greedy decoding of each prompt
    gives its target, with a margin; saved back in place."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = []
    for prompt, target in pairs:
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        batch.append((ids, labels))
    for step in range(max_steps):
        opt.zero_grad()
        loss = sum(model(input_ids=i, labels=lab).loss for i, lab in batch)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        if step % 10 == 9 and _memorized(model, batch):
            break
    else:
        raise RuntimeError(f"the tiny model did not learn {what}")
    model.eval().save_pretrained(path, safe_serialization=True)


def _memorized(model: Any, batch: list[Any]) -> bool:
    """Greedy decoding reproduces every target, with a margin (teacher forced)."""
    import torch

    with torch.no_grad():
        for ids, labels in batch:
            logits = model(input_ids=ids).logits[0, :-1]
            want = labels[0, 1:]
            mask = want != -100
            top2 = logits[mask].topk(2, dim=-1)
            if not bool((top2.indices[:, 0] == want[mask]).all()):
                return False
            if float((top2.values[:, 0] - top2.values[:, 1]).min()) < 2.0:
                return False
    return True
