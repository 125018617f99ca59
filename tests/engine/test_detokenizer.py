"""Incremental detokenization (multi-byte characters split over tokens) and stop strings."""

from __future__ import annotations

import pytest

from loraplex.engine.detokenizer import IncrementalDetokenizer, StopChecker, fast_decoder

TEXTS = [
    "Héllo wörld, naïve café",
    "emoji 🙂🚀✨ and 日本語のテキスト",
    "🙂",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention 🙂 keeps the KV cache in fixed-size blocks; 日本語. " * 6,  # window slides
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Prompt: ", "日本"])
def test_streamed_text_equals_full_decode_and_never_breaks(tok, text, prompt):
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode("🙂🚀")), "emoji must span tokens"
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_fast_decoder_streams_the_same_text(tok, text):
    decoder = fast_decoder(tok)
    assert decoder is tok.backend_tokenizer  # this tokenizer does no space clean-up
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(decoder, tok.encode("ctx "))
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)


def test_incomplete_character_is_held_then_flushed(tok):
    ids = tok.encode("a🙂")
    detok = IncrementalDetokenizer(tok, [])
    out = [detok.add(i) for i in ids[:-1]]
    assert "".join(out) == "a"  # the emoji's first bytes are held back
    assert detok.flush().endswith("\ufffd")  # at the end, what's left goes out as is


def test_stop_string_truncates_and_is_never_emitted_early():
    sc = StopChecker(("STOP",))
    emitted = []
    for piece in ["hello S", "T", "O", "P tail"]:
        hit = sc.add(piece)
        emitted.append(sc.take(final=hit))
        if hit:
            break
    assert emitted == ["hello ", "", "", ""] and sc.text == "hello "


def test_false_start_of_a_stop_string_is_released():
    sc = StopChecker(("STOP",))
    assert not sc.add("ST")
    assert sc.take(final=False) == ""
    assert not sc.add("ART")
    assert sc.take(final=False) == "START"


def test_earliest_of_several_stops_wins():
    sc = StopChecker(("world", "lo w"))
    assert sc.add("hello world")
    assert sc.take(final=True) == "hel"


def test_stop_spanning_pieces():
    sc = StopChecker(("\n\n",))
    assert not sc.add("line\n")
    assert sc.take(final=False) == "line"
    assert sc.add("\nnext")
    assert sc.take(final=True) == ""
    assert sc.text == "line"


@pytest.mark.parametrize("which", ["tiny_bpe", "dummy"])
def test_cached_pieces_stream_exactly_the_window_decode(tok, which):
    """The fast path (cached whole-character pieces) emits the very same deltas, step by
    step, as decoding the window, over random ids: broken bytes, specials, slides."""
    import random

    from loraplex.engine.detokenizer import TokenPieces
    from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

    base = tok if which == "tiny_bpe" else dummy_tokenizer(512)
    decoder = fast_decoder(base)
    pieces = TokenPieces(decoder)
    assert pieces.byte_level
    rng = random.Random(0)
    vocab = len(base)
    for trial in range(60):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
        if trial % 3 == 0:  # mostly valid text too
            ids = base.encode(TEXTS[trial % len(TEXTS)])[:100]
        slow = IncrementalDetokenizer(decoder, prompt)
        fast = IncrementalDetokenizer(decoder, prompt, pieces=pieces)
        assert [fast.add(i) for i in ids] == [slow.add(i) for i in ids]
        assert fast.flush() == slow.flush()


def test_held_back_tail_is_the_longest_stop_prefix():
    """The streamed hold-back and stop search against the plain definitions, on random
    texts fed in random pieces."""
    import random

    rng = random.Random(1)
    for _ in range(5000):
        stops = tuple(
            "".join(rng.choice("ab#<t") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 3))
        )
        text = "".join(rng.choice("ab#<tx") for _ in range(rng.randint(0, 12)))
        sc = StopChecker(stops)
        hit, fed = False, 0
        while fed < len(text) and not hit:
            n = rng.randint(1, 4)
            hit = sc.add(text[fed : fed + n])
            fed += n
        ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
        if ends:
            end, minus_len = min(ends)  # the earliest stop to complete; the longest of those
            stop = "x" * -minus_len
            assert hit and sc.text == text[: end - len(stop)], (text, stops)
            continue
        assert not hit and sc.text == text
        want = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        assert sc._held_back() == want, (text, stops)


def test_stop_checker_memory_is_linear_in_the_stop():
    """A 1 MiB stop string costs memory linear in its length (the old checker kept every
    prefix: quadratic, an OOM), and checking text against it stays fast."""
    import tracemalloc

    big = "x" * (1 << 20)
    tracemalloc.start()
    sc = StopChecker((big, "END"))
    for _ in range(200):
        sc.add("xxxxxxxx ")
        sc.take(final=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * len(big), peak  # the failure table: a list of small ints
    assert sc.add("the END") and sc.text.endswith("the ")
