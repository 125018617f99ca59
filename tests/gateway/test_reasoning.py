"""Thinking output as ``reasoning_content`` (vLLM's field), with the official SDK against real
uvicorn, on a tiny model taught to think in Qwen3's manner (harness.think_model): whole and
streamed, and switched off per request by the template's own flag through
``chat_template_kwargs``."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.think_model import ANSWER, REASONING, THOUGHT, build_think_llama, messages

from tests.gateway.live import BASE, Gateway

OFF = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's servers run the thinking model."""
    return build_think_llama(tmp_path_factory.mktemp("think-llama"))


def _stream(gateway: Gateway, **kwargs: object) -> tuple[str, str, list[str]]:
    """(reasoning, content, the kinds of the deltas in order) of a streamed answer."""
    reasoning, content, kinds = "", "", []
    for chunk in gateway.sdk("a").chat.completions.create(
        model=BASE,
        messages=messages(),
        temperature=0,
        stream=True,
        **kwargs,  # type: ignore[arg-type]
    ):
        for c in chunk.choices:
            thought = (c.delta.model_extra or {}).get("reasoning_content")
            if thought:
                reasoning += thought
                kinds.append("reasoning")
            if c.delta.content:
                content += c.delta.content
                kinds.append("content")
    return reasoning, content, kinds


def test_thinking_goes_to_reasoning_content(gateway: Gateway) -> None:
    r = gateway.sdk("a").chat.completions.create(model=BASE, messages=messages(), temperature=0)
    (choice,) = r.choices
    assert choice.finish_reason == "stop"
    assert (choice.message.model_extra or {}).get("reasoning_content") == REASONING
    assert choice.message.content == "\n\n" + ANSWER  # as generated after </think>
    reasoning, content, kinds = _stream(gateway)
    assert (reasoning, content) == (REASONING, "\n\n" + ANSWER)
    first_content = kinds.index("content")
    assert set(kinds[:first_content]) == {"reasoning"} and "reasoning" not in kinds[first_content:]


def test_thinking_switched_off_per_request(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.chat.completions.create(
        model=BASE, messages=messages(), temperature=0, extra_body=OFF
    )
    (choice,) = r.choices
    assert choice.message.content == ANSWER
    assert "reasoning_content" not in (choice.message.model_extra or {})
    reasoning, content, kinds = _stream(gateway, extra_body=OFF)
    assert (reasoning, content) == ("", ANSWER) and set(kinds) == {"content"}


def test_a_cut_off_think_block_is_all_reasoning(gateway: Gateway) -> None:
    r = gateway.sdk("a").chat.completions.create(
        model=BASE, messages=messages(), temperature=0, max_tokens=10
    )
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.message.content is None
    thought = (choice.message.model_extra or {}).get("reasoning_content")
    assert thought and REASONING.startswith(thought) and not THOUGHT.startswith(thought)
    assert _stream(gateway, max_tokens=10)[:2] == (thought, "")


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"tokenize": False}, "tokenize"),
        ({"eos_token": 1}, "eos_token"),
        ({"enable_thinking": "no"}, "chat_template_kwargs"),
        ({"a b": True}, "a b"),
    ],
)
def test_bad_template_kwargs_refused(gateway: Gateway, kwargs: dict, word: str) -> None:
    body = {"model": BASE, "messages": messages(), "chat_template_kwargs": kwargs}
    with gateway.http("a") as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert word in r.text
