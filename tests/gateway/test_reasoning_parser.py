"""The think-block reader from primitives: whole outputs, and every way of cutting one
into deltas giving the same reasoning and content as the whole."""

from __future__ import annotations

import pytest

from loraplex.gateway.reasoning import ReasoningStream, reasoning_for_template, split_reasoning

CASES = [
    ("<think>\nabc\n</think>\n\nThe answer.", "\nabc\n", "\n\nThe answer."),
    ("\n<think>x</think>y", "x", "y"),  # whitespace before the block
    ("<think></think>only content", "", "only content"),
    ("<think>cut off by max_tokens </th", "cut off by max_tokens </th", ""),
    ("No thinking at all.", None, "No thinking at all."),
    ("<thi", None, "<thi"),  # cut inside the start tag: not a think block
    ("a <think>b</think> c", None, "a <think>b</think> c"),  # not at the start: content
    ("<think>one</think> two </think>", "one", " two </think>"),
    ("", None, ""),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
def test_whole_output(text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
def test_any_two_cuts_stream_the_same(text: str, reasoning: str | None, content: str) -> None:
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            p = ReasoningStream()
            pieces = p.feed(text[:i]) + p.feed(text[i:j]) + p.feed(text[j:]) + p.finish()
            kinds = [k for k, _ in pieces]
            assert all(t for _, t in pieces)
            assert kinds == sorted(kinds, reverse=True)  # reasoning, then content
            assert "".join(t for k, t in pieces if k == "reasoning") == (reasoning or "")
            assert "".join(t for k, t in pieces if k == "content") == content


def test_which_templates_think() -> None:
    assert reasoning_for_template("...{{- '<think>\\n\\n</think>\\n\\n' }}...")
    assert not reasoning_for_template("{% for m in messages %}{{ m.content }}{% endfor %}")
