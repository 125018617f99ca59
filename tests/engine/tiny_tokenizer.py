"""A byte-level BPE tokenizer trained on a few sentences: no hub access needed.

A plain module (not conftest) so tests can import it by name: several conftest.py files
exist under tests/, and ``from conftest import ...`` picks whichever was imported first.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A multi-tenant LoRA gateway serves many adapters on one base model.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching admits new requests every step.",
    "Héllo wörld, naïve café, 日本語のテキスト, emoji 🙂🚀✨ and more.",
] * 20


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast
