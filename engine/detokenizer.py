"""Incremental detokenization that never emits a broken UTF-8 sequence, and stop strings.

:class:`IncrementalDetokenizer` decodes a sliding window of tokens (a few prompt tokens
for context, so tokenizers that drop a leading space decode as in the full text) and
emits the new text only once it no longer ends in U+FFFD, i.e. once a multi-byte
character split over several tokens is complete. :class:`StopChecker` truncates at a
stop string and holds back text that could be the start of one.
"""

from __future__ import annotations

from typing import Protocol

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._read = len(self._ids)  # ids[:read] are emitted (or prompt): context only

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (maybe empty)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end: whatever is held back, broken or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[: self._read])
        after = self._decode(self._ids)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        if not after.startswith(before):  # a merge changed earlier text; rare
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            before = before[:common]
        new = after[len(before) :]
        # slide the window: the tokens just emitted become the next decode's context
        del self._ids[: self._read]
        self._read = len(self._ids)
        return new


class StopChecker:
    """Tracks one choice's text; finds stop strings; says how much is safe to emit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0  # chars of ``text`` already handed out

    def add(self, new_text: str) -> bool:
        """Append text; on a stop string, truncate before it and return True."""
        if not new_text:
            return False
        start = len(self.text)
        self.text += new_text
        hit = -1
        for stop in self._stops:
            i = self.text.find(stop, max(0, start - len(stop) + 1))
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self.text = self.text[:hit]
            return True
        return False

    def take(self, final: bool) -> str:
        """Text not yet emitted, minus a tail that could still become a stop string."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
