"""Thinking output (Qwen3's ``<think>...</think>``) apart from the answer: ``reasoning_content``.

A served model whose chat template writes think blocks (Qwen3's does, and reads its own
``enable_thinking`` flag, which a request sets through ``chat_template_kwargs``) has its
output read here, as vLLM's ``qwen3`` reasoning parser does: an output that begins with
``<think>`` is reasoning up to ``</think>``, the rest is content; an output that does not
begin with it (thinking switched off: the template put an empty think block in the prompt)
is all content; a think block cut off by ``max_tokens`` is all reasoning. The tags
themselves are in neither, and the text in between is kept as generated (vLLM's field
values). A whole response and a stream give the same text: one parser reads both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from loraplex.engine.api import SamplingParams

THINK_START, THINK_END = "<think>", "</think>"
Kind = Literal["reasoning", "content"]


def think_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The think tags' token ids when each is one token (Qwen3's are), else None."""
    ids = []
    for tag in (THINK_START, THINK_END):
        got = list(tokenizer.encode(tag, add_special_tokens=False))
        if len(got) != 1:
            return None
        ids.append(got[0])
    return ids[0], ids[1]


def with_think_block(sampling: SamplingParams, tokenizer: Any) -> SamplingParams:
    """A constrained request to a thinking model: its grammar lets the output open with a
    think block and holds from the token after ``</think>`` (vLLM applies structured
    outputs after the reasoning too). Unchanged when the tags are not single tokens."""
    ids = think_token_ids(tokenizer)
    if ids is None or sampling.grammar is None:
        return sampling
    grammar = msgspec.structs.replace(sampling.grammar, think_start=ids[0], think_end=ids[1])
    return msgspec.structs.replace(sampling, grammar=grammar)


def reasoning_for_template(template: str) -> bool:
    """Whether the model's chat template writes think blocks (Qwen3, QwQ, DeepSeek-R1...)."""
    return THINK_START in template and THINK_END in template


def _held(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (kept back: it may be the
    tag, split across deltas)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningStream:
    """Reads one choice's text delta by delta: ``feed`` and ``finish`` return its pieces,
    each ``(kind, text)`` with non-empty text, in order."""

    mode: Literal["start", "reasoning", "content"] = "start"
    buf: str = ""
    thought: bool = False  # the output began with a think block
    out: list[tuple[Kind, str]] = field(default_factory=list)

    def _emit(self, kind: Kind, text: str) -> None:
        if text:
            self.out.append((kind, text))

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        self.buf += text
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_START):
                self.mode, self.buf, self.thought = "reasoning", head[len(THINK_START) :], True
            elif not THINK_START.startswith(head):  # (an empty head waits too)
                self.mode = "content"
        if self.mode == "reasoning":
            reasoning, end, rest = self.buf.partition(THINK_END)
            if end:
                self._emit("reasoning", reasoning)
                self.mode, self.buf = "content", rest
            else:
                keep = _held(self.buf, THINK_END)
                self._emit("reasoning", self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
        if self.mode == "content":
            self._emit("content", self.buf)
            self.buf = ""
        out, self.out = self.out, []
        return out

    def finish(self) -> list[tuple[Kind, str]]:
        """The text held back at the end of the output."""
        self._emit("reasoning" if self.mode == "reasoning" else "content", self.buf)
        self.buf = ""
        out, self.out = self.out, []
        return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A whole output -> ``(reasoning or None, content)``."""
    parser = ReasoningStream()
    pieces = parser.feed(text) + parser.finish()
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    return (reasoning if parser.thought else None), content
