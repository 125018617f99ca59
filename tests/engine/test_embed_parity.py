"""Embeddings of the engine (LLMEngine over the real ModelRunner, float32 on CPU) against
transformers: the final hidden state (``output_hidden_states[-1]``: after the final norm)
of each input's last token, L2-normalized, which is the documented pooling
(``engine.api.EMBEDDING_POOLING``). Base model and PEFT adapters (not merged), in one batch
with generating requests, long inputs prefilled in chunks, and a prefix-cache hit."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
import torch
from model_builders import AdapterSpec, build_adapter, build_hf_model, load_hf

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path, load_model
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.offline import OfflineEngine

TOL = 1e-4  # max abs difference of unit vectors
SPECS = [
    AdapterSpec(rank=8, targets=("q_proj", "v_proj", "down_proj"), alpha=16, seed=1),
    AdapterSpec(rank=16, targets=("o_proj", "gate_proj", "up_proj"), alpha=32, seed=2),
]


def hf_embeddings(model, inputs: list[list[int]]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for ids in inputs:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            rows.append(torch.nn.functional.normalize(out.hidden_states[-1][0, -1].float(), dim=0))
    return torch.stack(rows)


def engine_over(
    model, device: str = "cpu", dtype: torch.dtype = torch.float32, **cfg
) -> OfflineEngine:
    runner = ModelRunner(
        model,
        device=device,
        dtype=dtype,
        block_size=4,
        max_num_seqs=8,
        max_model_len=128,
        max_loras=2,
        max_lora_rank=16,
        num_blocks=256,
    )
    config = EngineConfig(device=device, block_size=4, max_loras=2, max_lora_rank=16, **cfg)
    return OfflineEngine(LLMEngine(runner, config))


def run(engine: OfflineEngine, requests: list[Request]) -> dict[str, torch.Tensor | None]:
    """Every request to its end -> each one's embedding (None for generating ones)."""
    for r in requests:
        engine.add_request(r)
    got: dict[str, torch.Tensor | None] = {}
    for _ in range(5000):
        for o in engine.step():
            if o.finished:
                assert o.error is None, o.error
                e = o.embedding
                got[o.request_id] = (
                    None if e is None else torch.tensor(struct.unpack(f"<{len(e) // 4}f", e))
                )
        if not engine.has_unfinished():
            return got
        if not engine.last_step_ran:
            threading.Event().wait(0.002)  # adapter loads run in worker threads
    raise AssertionError("engine did not finish")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("embed-llama")
    base = build_hf_model(root / "base", "llama", seed=5)
    return base, [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(SPECS)]


@pytest.mark.parametrize(
    ("device", "dtype", "tol"),
    [
        ("cpu", torch.float32, TOL),
        pytest.param("cuda", torch.bfloat16, 3e-2, marks=pytest.mark.gpu),
    ],
)
def test_base_and_adapters_match_transformers_in_a_mixed_batch(tiny, device, dtype, tol):
    """On CUDA (bf16 against float32 references, as test_gpu_parity): Triton kernels, decode
    CUDA graphs (the repeat below pools inside a graph replay), pinned copies of vectors."""
    from peft import PeftModel

    base, adapters = tiny
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (1, 9, 40, 17, 77)]
    # inputs 0..2 on the base, 3 with adapter 0, 4 with adapter 1
    refs = [
        None,
        None,
        None,
        AdapterRef("a0", str(adapters[0])),
        AdapterRef("a1", str(adapters[1])),
    ]
    engine = engine_over(
        str(base), device, dtype, max_num_batched_tokens=32, enable_prefix_caching=True
    )
    pooled_in_decode: list[bool] = []
    run_step = engine.core.runner.run

    def recording(batch, prev_tokens=None):  # type: ignore[no-untyped-def]
        pooled_in_decode.append(batch.is_decode and any(c.pool for c in batch.chunks))
        return run_step(batch, prev_tokens)

    engine.core.runner.run = recording  # type: ignore[method-assign]
    gen = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = [Request("g0", inputs[2][:10], gen), Request("g1", inputs[1], gen, refs[4])]
    requests += [
        Request(f"e{i}", ids, adapter=ref, task="embed")
        for i, (ids, ref) in enumerate(zip(inputs, refs, strict=True))
    ]
    got = run(engine, requests)

    hf = load_hf(base)
    peft = PeftModel.from_pretrained(hf, str(adapters[0]), adapter_name="a0")
    peft.load_adapter(str(adapters[1]), adapter_name="a1")
    with peft.disable_adapter():
        want = list(hf_embeddings(peft, inputs[:3]))
    for i, name in ((3, "a0"), (4, "a1")):
        peft.set_adapter(name)
        want.append(hf_embeddings(peft, [inputs[i]])[0])
    for i, w in enumerate(want):
        v = got[f"e{i}"]
        assert v is not None and v.shape == (64,)
        assert max_err(v, w) < tol, f"input {i}: {max_err(v, w):.2e}"
    # sharp: the adapter moves the vector far outside the tolerance
    with peft.disable_adapter():
        base_of_3 = hf_embeddings(peft, [inputs[3]])[0]
    assert max_err(got["e3"], base_of_3) > 100 * TOL  # type: ignore[arg-type]
    assert engine.core.blocks.num_used == 0 and engine.core.slots.is_idle()

    # the same input again while another request decodes: served from the prefix cache,
    # its last chunk is one token at a position > 0, so the step is a decode step
    engine.add_request(Request("g2", inputs[1], SamplingParams(max_tokens=12, ignore_eos=True)))
    for _ in range(3):
        engine.step()
    again = run(engine, [Request("again", inputs[4], adapter=refs[4], task="embed")])
    assert max_err(again["again"], want[4]) < tol  # type: ignore[arg-type]
    assert any(pooled_in_decode), "the repeat did not pool in a decode step"
    assert engine.core.blocks.is_whole() and engine.core.slots.is_idle()
    engine.shutdown()


def test_smollm2_embeddings_match_transformers():
    """The default model (SmolLM2-135M-Instruct GGUF, dequantized by transformers)."""
    path = default_model_path()
    hf = load_hf(path.parent, gguf_file=path.name)
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    tok = loaded.tokenizer
    texts = ["Hello, my name is", "The capital of France is Paris.", "def fib(n):"]
    inputs = [list(tok.encode(t)) for t in texts]
    engine = engine_over(loaded, max_num_batched_tokens=8)  # several chunks per input
    got = run(engine, [Request(f"e{i}", ids, task="embed") for i, ids in enumerate(inputs)])
    want = hf_embeddings(hf, inputs)
    for i in range(len(inputs)):
        assert max_err(got[f"e{i}"], want[i]) < TOL, f"input {i}"  # type: ignore[arg-type]
    engine.shutdown()
