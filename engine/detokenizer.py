"""Incremental detokenization that never emits a broken UTF-8 sequence, and stop strings.

:class:`IncrementalDetokenizer` decodes a sliding window of tokens (a few prompt tokens
for context, so tokenizers that drop a leading space decode as in the full text) and
emits the new text only once it no longer ends in U+FFFD, i.e. once a multi-byte
character split over several tokens is complete; with :class:`TokenPieces` (each token's
text, decoded once) it skips that decode for whole-character tokens of a byte-level
tokenizer. :class:`StopChecker` truncates at a stop string and holds back text that could be
the start of one. Both run on the client side of the engine (``engine.output_processor``).
"""

from __future__ import annotations

from typing import Any, Protocol

_CONTEXT_TOKENS = 5
_WINDOW = 32
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def fast_decoder(tokenizer: Any) -> Decoder:
    """The Rust tokenizer behind a transformers fast tokenizer, where decoding through it
    gives the same text (no clean-up of spaces); it skips per-call Python overhead."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend
    return tokenizer


class TokenPieces:
    """Each token's text on its own (``decode([id])``), decoded once per id and kept.

    Caching the single-token decode is exact for any tokenizer. Where the decoder is
    byte-level (the text of ids is the UTF-8 of their bytes joined), a token whose piece
    holds no U+FFFD is a whole UTF-8 string, and appended to a window whose text ends on a
    character boundary it adds exactly its piece: :meth:`appendable` says so, and
    :class:`IncrementalDetokenizer` then skips the window decode.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tok = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self._text: tuple[dict[int, str], dict[int, str]] = ({}, {})  # by skip_special_tokens
        self._whole: dict[int, str | None] = {}  # skip_special_tokens=True only

    def text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        cache = self._text[skip_special_tokens]
        piece = cache.get(token_id)
        if piece is None:
            piece = cache[token_id] = self._tok.decode(
                [token_id], skip_special_tokens=skip_special_tokens
            )
        return piece

    def appendable(self, token_id: int) -> str | None:
        """The token's text (special tokens skipped) if it appends as is; else None."""
        try:
            return self._whole[token_id]
        except KeyError:
            piece = self.text(token_id, True)
            ok = self.byte_level and _REPLACEMENT not in piece
            self._whole[token_id] = piece if ok else None
            return piece if ok else None


def _is_byte_level(tokenizer: Any) -> bool:
    try:
        from tokenizers import Tokenizer, decoders
    except ImportError:
        return False
    return isinstance(tokenizer, Tokenizer) and isinstance(tokenizer.decoder, decoders.ByteLevel)


class IncrementalDetokenizer:
    """One decode of a short token window per new token (none on the fast path).

    The window starts with a few context tokens whose text is never emitted; each new
    token re-decodes the window and emits what follows the text already out. Every
    ``_WINDOW`` tokens the window slides forward (one extra decode). With ``pieces`` on a
    byte-level tokenizer, a whole-character token after a window that ends on a character
    boundary emits its cached piece without decoding (the same text, see
    :class:`TokenPieces`).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        pieces: TokenPieces | None = None,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._pieces = pieces if pieces is not None and skip_special_tokens else None
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._set_out(self._decode(self._ids))  # context text: never emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _set_out(self, text: str) -> None:
        self._out_len = len(text)  # window text accounted for (context + emitted)
        # the window's text is all accounted for and ends on a character boundary
        self._clean = not text.endswith(_REPLACEMENT)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (maybe empty)."""
        self._ids.append(token_id)
        if self._clean and self._pieces is not None:
            piece = self._pieces.appendable(token_id)
            if piece is not None:
                self._out_len += len(piece)
                if len(self._ids) > _WINDOW:
                    self._slide()
                return piece
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end: whatever is held back, broken or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT) and not final:
            self._clean = False
            return ""  # a multi-byte character is still incomplete
        # decoding more tokens may rewrite earlier text (space clean-up); never retract
        new = text[self._out_len :]
        self._set_out(text)
        if len(self._ids) > _WINDOW:
            self._slide()
        return new

    def _slide(self) -> None:
        """Keep a little context, forget the rest."""
        self._ids = self._ids[-_CONTEXT_TOKENS:]
        self._set_out(self._decode(self._ids))


class _StopMatcher:
    """One stop string as a streaming KMP automaton: ``state`` is the length of the longest
    prefix of the stop that ends the text fed so far. Memory linear in the stop's length,
    amortized O(1) per character."""

    __slots__ = ("fail", "state", "stop")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            fail[i] = k
        self.fail = fail
        self.state = 0

    def feed(self, c: str) -> bool:
        """Advance by one character; True when the whole stop string has just matched."""
        stop, k = self.stop, self.state
        while k and stop[k] != c:
            k = self.fail[k - 1]
        if stop[k] == c:
            k += 1
        if k == len(stop):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


class StopChecker:
    """Tracks one choice's text; finds stop strings; says how much is safe to emit.

    Memory and time are linear in the stop strings and the text: each stop is a streaming
    automaton fed the new text once (no prefix sets, no re-scans); the text held back is
    the longest stop prefix that ends it, read off the automata's states.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._matchers = [_StopMatcher(s) for s in stops if s]
        self._chars = frozenset(c for m in self._matchers for c in m.stop)
        self._partial = False  # some automaton is past its start state
        self.text = ""
        self.emitted = 0  # chars of ``text`` already handed out

    def add(self, new_text: str) -> bool:
        """Append text; on a stop string, truncate before it and return True. The earliest
        stop to complete wins (the longest, if several complete at once)."""
        if not new_text:
            return False
        start = len(self.text)
        self.text += new_text
        matchers, chars = self._matchers, self._chars
        if not matchers:
            return False
        for i, c in enumerate(new_text):
            if c not in chars:  # no stop holds c: every automaton restarts
                if self._partial:
                    for m in matchers:
                        m.state = 0
                    self._partial = False
                continue
            hit = 0  # the longest stop that completes here (it starts earliest)
            for m in matchers:
                if m.feed(c) and len(m.stop) > hit:
                    hit = len(m.stop)
            if hit:
                self.text = self.text[: start + i + 1 - hit]
                return True
            self._partial = True
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
        """Length of the longest tail of ``text`` that is a proper prefix of a stop."""
        if not self._partial:
            return 0
        return max(m.state for m in self._matchers)
