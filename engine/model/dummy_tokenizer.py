"""A byte-level tokenizer for ``dummy:`` models: any text encodes, every id decodes.

Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, then the 256 byte-level symbols, then filler
tokens ``<tN>`` up to ``vocab_size`` (random weights sample them; they decode as text).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

_SPECIALS = ["<pad>", "<s>", "</s>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def dummy_tokenizer(vocab_size: int, eos_token_id: int = 2) -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<t{len(vocab)}>"] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} byte-level tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    eos = _SPECIALS[eos_token_id] if eos_token_id < len(_SPECIALS) else "</s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
    )
