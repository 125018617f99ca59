"""Model output -> OpenAI ``tool_calls``: one parser per output format, fed text as it streams.

A parser takes the completion's text in pieces (the engine's deltas) and gives back events:
plain content, the start of a call (its name) and its arguments. The whole (non-streaming)
response runs the same parser over the whole text, so both ways agree. Text that looks like
a call but does not parse (broken JSON, no name) is given back as content: a malformed call
never fails the request.

Formats:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, any
  number, after optional text. Qwen 2/2.5/3, Hermes and SmolLM3 templates ask for it, and
  it is what the gateway's own tools prompt asks of a model whose template has no tools
  section (``gateway.chat_messages``).
- ``llama3_json``: Llama 3.1/3.2's JSON tool calls: the whole output is
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``), several
  separated by ``;``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

ParserName = Literal["hermes", "llama3_json"]
PARSERS: tuple[ParserName, ...] = ("hermes", "llama3_json")


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    """One complete call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


Event = Content | Call


class StreamParser(Protocol):
    def feed(self, text: str) -> list[Event]: ...
    def finish(self) -> list[Event]: ...


def _call_from(obj: Any, args_keys: tuple[str, ...]) -> Call | None:
    """A call from a decoded JSON object, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(name, json.dumps(args, ensure_ascii=False))


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (held back: it may be the
    start of the tag, split across deltas)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._calls = 0

    def _content(self, text: str) -> list[Event]:
        if not text or (self._calls and not text.strip()):
            return []  # whitespace between calls is not content
        return [Content(text)]

    def _block(self, block: str) -> list[Event]:
        try:
            call = _call_from(json.loads(block), ("arguments", "parameters"))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return self._content(self.OPEN + block + self.CLOSE)
        self._calls += 1
        return [call]

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buf.find(self.CLOSE)
                if end < 0:
                    return events
                events += self._block(self._buf[:end])
                self._buf = self._buf[end + len(self.CLOSE) :]
                self._in_call = False
                continue
            start = self._buf.find(self.OPEN)
            if start >= 0:
                events += self._content(self._buf[:start])
                self._buf = self._buf[start + len(self.OPEN) :]
                self._in_call = True
                continue
            keep = _held_prefix(self._buf, self.OPEN)
            events += self._content(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return events

    def finish(self) -> list[Event]:
        """The end of the output: an unclosed block counts if its JSON is whole (the model
        stopped at end-of-sequence instead of writing ``</tool_call>``, or ``max_tokens``
        cut that tag short: ``{...}\n</tool_call``)."""
        rest, self._buf = self._buf, ""
        if not self._in_call:
            return self._content(rest)
        self._in_call = False
        body = rest[: len(rest) - _held_prefix(rest, self.CLOSE)]
        try:
            call = _call_from(json.loads(body), ("arguments", "parameters"))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return self._content(self.OPEN + rest)
        self._calls += 1
        return [call]


class Llama3JsonParser:
    """The output is calls only, or text only: decided by its first character."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._buf = ""
        self._mode: Literal["undecided", "text", "json"] = "undecided"

    def feed(self, text: str) -> list[Event]:
        if self._mode == "text":
            return [Content(text)] if text else []
        self._buf += text
        if self._mode == "json":
            return []
        head = self._buf.lstrip()
        if not head or (self.TAG.startswith(head) and head != self.TAG):
            return []  # not decided yet
        if head.startswith(("{", self.TAG)):
            self._mode = "json"
            return []
        self._mode = "text"
        rest, self._buf = self._buf, ""
        return [Content(rest)]

    def finish(self) -> list[Event]:
        rest, self._buf = self._buf, ""
        if self._mode != "json":
            return [Content(rest)] if rest else []
        calls = self._calls(rest.strip().removeprefix(self.TAG))
        return list(calls) if calls else [Content(rest)]

    @staticmethod
    def _calls(text: str) -> list[Call] | None:
        decoder = json.JSONDecoder()
        calls: list[Call] = []
        pos = 0
        while True:
            while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
                pos += 1
            if pos == len(text):
                return calls or None
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                return None
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


def make_parser(name: ParserName) -> StreamParser:
    return HermesParser() if name == "hermes" else Llama3JsonParser()


def parser_for_template(template: str | None, setting: str | None = None) -> ParserName:
    """The format a model writes its calls in, read from its chat template (the setting
    ``tool_call_parser`` overrides it). A template without a tools section gets the
    gateway's Hermes tools prompt, so Hermes is also the default."""
    if setting:
        if setting not in PARSERS:
            raise ValueError(f"unknown tool call parser {setting!r}; one of {PARSERS}")
        return setting  # type: ignore[return-value]
    text = template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "<|python_tag|>" in text or '"parameters"' in text:
        return "llama3_json"
    return "hermes"


def parse(name: ParserName, text: str) -> tuple[str, list[Call]]:
    """A whole output: its content (the text that is not a call) and its calls."""
    parser = make_parser(name)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, [e for e in events if isinstance(e, Call)]
