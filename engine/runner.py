"""What the engine needs of a model runner, and how one is built from a config.

The runner (``engine/model_runner.py``) owns every tensor; the engine talks to it through
these few members only, so tests can hand the engine a small stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from loraplex.engine.batch import ScheduledBatch
from loraplex.engine.config import EngineConfig
from loraplex.engine.lora.slots import PageNeed, PagePlan
from loraplex.engine.model.config import ModelConfig


@dataclass
class StepTensors:
    """One forward's results, on the device."""

    logits: torch.Tensor  # [chunks with sample=True, vocab] float32, in chunk order
    # [chunks with pool=True, hidden] float32, in chunk order: each such chunk's last token's
    # final normed hidden state, L2-normalized (``engine.api.EMBEDDING_POOLING``); None: none
    pooled: torch.Tensor | None = None


class Runner(Protocol):
    config: ModelConfig  # the base model's shape (adapter validation, model info)
    device: torch.device
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    # sliding-window layers beside full ones (Gemma 2/3) in groups that read tables of
    # their own over the same pool (block_manager.WindowedBlocks): the window and the local
    # layer groups; a window and 0 groups: every layer local (block_manager.LocalBlocks);
    # no window: one table for every layer
    kv_window: int
    kv_local_groups: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: Any  # a collection of ints
    tokenizer: Any  # a transformers tokenizer (encode / decode)
    lora_plan: PagePlan  # how GPU adapter memory is cut into slots and pages

    def execute(
        self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward -> float32 logits ``[chunks with sample=True, vocab]``. Tokens that
        ``batch.gather`` names come from ``prev_tokens`` (the previous step's samples, on
        the device)."""
        ...

    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        """``execute`` that also returns the pooled hidden states of ``pool`` chunks."""
        ...

    def read_adapter(self, path: Path) -> Any:
        """Read and validate a PEFT directory into host memory; any thread."""
        ...

    def adapter_pages(self, weights: Any) -> PageNeed:
        """The GPU pages of each projection group that ``weights`` takes."""
        ...

    def write_slot(self, slot: int, weights: Any, pages: dict[str, list[int]]) -> None: ...

    def clear_slot(self, slot: int) -> None: ...

    def check_alive(self) -> None:
        """Raise ``engine.errors.RunnerFailed`` when a part of the runner is gone (a
        tensor-parallel rank's process); cheap, called on idle turns."""
        ...

    def close(self) -> None:
        """Stop what the runner started (tensor-parallel worker processes)."""
        ...


def runner_options(config: EngineConfig) -> dict[str, Any]:
    """``ModelRunner``'s keyword arguments from the engine config (device and dtype
    resolved)."""
    return {
        "device": config.resolved_device(),
        "dtype": config.resolved_dtype(),
        "block_size": config.block_size,
        "max_num_seqs": config.max_num_seqs,
        "max_model_len": config.max_model_len,
        "max_loras": config.max_loras,
        "max_lora_rank": config.max_lora_rank,
        "lora_memory_bytes": config.lora_memory_bytes,
        "lora_memory_fraction": config.lora_memory_fraction,
        "kv_cache_bytes": config.kv_cache_bytes,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "num_blocks": config.num_gpu_blocks,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enforce_eager": config.enforce_eager,
        "prefill_graph_tokens": config.prefill_graph_tokens,
        "seed": config.seed,
        "quantization": config.quantization,
        "fp8_w8a8_min_tokens": config.fp8_w8a8_min_tokens,
        "kv_cache_dtype": config.kv_cache_dtype,
        "kernel_config_dir": config.kernel_config_dir,
        "kernel_tuning": config.kernel_tuning,
    }


def build_runner(model: str | Path | None, config: EngineConfig) -> Runner:
    """``model``: an HF directory, a ``.gguf`` file or ``dummy:<preset>`` (None: default).
    ``tensor_parallel_size`` > 1: a :class:`~loraplex.engine.tp_runner.TPRunner` (this
    process is rank 0 and drives one worker process per other rank); 1: the runner itself,
    in this process."""
    from loraplex.engine.model_runner import ModelRunner

    config.validate()
    if config.tensor_parallel_size > 1:
        from loraplex.engine.tp_runner import TPRunner

        return TPRunner(model, config)
    return ModelRunner(model, **runner_options(config))
