"""Tiny checkpoints built offline: a byte-level BPE tokenizer with a chat template, a random
2-layer Llama, and PEFT LoRA adapters whose ``lora_B`` is randomized (PEFT starts it at zero,
which would leave the base model's outputs unchanged)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A multi-tenant LoRA gateway serves many adapters on one base model.",
    "Hello! How can I help you today? Tell me a story about a robot.",
    "Paged attention keeps the KV cache in fixed-size blocks; batching is continuous.",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂🚀 and numbers 0123456789.",
] * 20

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2 uses: the base model's own template is what serving applies.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_llama(path: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64, GQA 4/2 heads) with its tokenizer, in ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # large: well-separated logits, so greedy has no near-ties
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=False
    ).save_pretrained(path)
    return path


def build_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    targets: list[str],
    seed: int,
    alpha: int | None = None,
) -> Path:
    """A PEFT LoRA for the model in ``base_dir``, saved with ``save_pretrained`` in ``out_dir``
    (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.base_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir
