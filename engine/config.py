"""Engine configuration: the few numbers that size the engine, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.errors import InvalidRequest

KV_CACHE_DTYPES = ("auto", "fp8")  # the model's dtype; e4m3 with a scale of 1


def host_memory_bytes() -> int:
    """The memory this process may use: physical memory, or the cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """What the operator chooses. The runner sizes the KV pool; the scheduler gets ints.

    ``num_gpu_blocks`` pins the KV pool to an exact size (tests, benchmarks): the memory of
    that many blocks of every layer (a model with sliding-window layers gets more block ids,
    each of one group of layers: ``ModelRunner._kv_layout``); otherwise the runner derives
    it from ``kv_cache_bytes`` or, on GPU, from ``gpu_memory_utilization`` of the memory
    left after a warm-up.
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own context length
    # GPU adapter memory, in bytes (pages of rank rows, engine/lora/pool.py); None: on GPU
    # lora_memory_fraction of the memory gpu_memory_utilization leaves after the weights, on
    # CPU room for max_loras (8 when None) adapters of max_lora_rank on every projection
    lora_memory_bytes: int | None = None
    lora_memory_fraction: float = 0.2
    # Deprecated: a cap on adapters resident on GPU at once (the byte budget sets how many
    # fit; None: no cap beyond it). Kept for tests that force evictions.
    max_loras: int | None = None
    max_lora_rank: int = 64
    # The host tier: loaded adapters kept in (pinned, on GPU) host memory, bounded in bytes
    # (None: host_lora_memory_fraction of the machine's memory) and optionally in count.
    host_lora_bytes: int | None = None
    host_lora_memory_fraction: float = 0.2
    max_cpu_loras: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_bytes: int | None = None
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # "auto": cuda if available, else cpu
    enforce_eager: bool = False  # no CUDA graphs
    # prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs
    # (engine/model/prefill_graphs.py); larger ones run eagerly. 0: none
    prefill_graph_tokens: int = 1024
    max_waiting: int = 4096  # queued requests beyond this are refused (EngineOverloaded)
    aging_steps: int = 64  # a request held back this many steps blocks those behind it
    # With several fairness keys active: the prefill tokens a step gives to the keys that
    # hold more than their share of the batch while another leaves part of its share
    # unused. Keeps the steps short for the key whose seats they borrow (docs/fairness.md).
    # At or above max_num_batched_tokens: no bound of its own.
    contended_prefill_tokens: int = 2048
    adapter_load_workers: int = 4
    seed: int = 0  # for requests without their own seed
    # Launch step n+1 before reading step n's tokens (the host's work overlaps the GPU's);
    # steps with penalty requests (their sampling reads the tokens) run one at a time.
    async_scheduling: bool = True
    # "fp8": the base model's projections quantized at load to e4m3 with per-channel scales
    # (an FP8 checkpoint loads as FP8 whatever this says); adapters stay in ``dtype``
    quantization: str | None = None
    # FP8 projections: from this many tokens in a step on, FP8 activations (quantized per
    # token inside the Triton GEMM up to 32 tokens, per token for torch._scaled_mm past that);
    # below it the weight-only FP8 kernel (bf16 activations). 1: every step
    fp8_w8a8_min_tokens: int = 1
    # "fp8": the KV cache in e4m3 (scale 1, saturating at +-448): twice the tokens in the
    # same memory, half the KV bytes a decode step reads; "auto": the model's dtype
    kv_cache_dtype: str = "auto"
    # where measured kernel launch configs are kept, one JSON file per GPU model (None: none
    # kept; the kernels size themselves from the device's properties); with
    # ``kernel_tuning`` the warm-up measures the shapes missing from it
    kernel_config_dir: Path | None = None
    kernel_tuning: bool = True
    # Split the model over this many GPUs of one host (one worker process per rank, the
    # scheduler stays in this process): heads, KV heads, intermediate size and vocabulary
    # must divide by it. Adds per-rank timeouts on its collectives.
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 600.0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def resolved_host_lora_bytes(self) -> int:
        if self.host_lora_bytes is not None:
            return self.host_lora_bytes
        return int(self.host_lora_memory_fraction * host_memory_bytes())

    def validate(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.block_size >= 1, "block_size", "must be positive"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be positive"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be positive"),
            (self.prefill_graph_tokens >= 0, "prefill_graph_tokens", "must be 0 or more"),
            (
                self.max_model_len is None or self.max_model_len >= 1,
                "max_model_len",
                "must be positive",
            ),
            (self.max_loras is None or self.max_loras >= 1, "max_loras", "must be positive"),
            (self.max_lora_rank >= 1, "max_lora_rank", "must be positive"),
            (
                self.max_loras is None
                or self.max_cpu_loras is None
                or self.max_cpu_loras >= self.max_loras,
                "max_cpu_loras",
                "must be >= max_loras",
            ),
            (
                self.host_lora_bytes is None or self.host_lora_bytes > 0,
                "host_lora_bytes",
                "must be positive",
            ),
            (
                0.0 < self.host_lora_memory_fraction <= 0.9,
                "host_lora_memory_fraction",
                "must be in (0, 0.9]",
            ),
            (
                self.lora_memory_bytes is None or self.lora_memory_bytes > 0,
                "lora_memory_bytes",
                "must be positive",
            ),
            (0.0 < self.lora_memory_fraction < 1.0, "lora_memory_fraction", "must be in (0, 1)"),
            (
                self.num_gpu_blocks is None or self.num_gpu_blocks >= 1,
                "num_gpu_blocks",
                "must be positive",
            ),
            (
                self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
                "kv_cache_bytes",
                "must be positive",
            ),
            (
                0.0 < self.gpu_memory_utilization <= 1.0,
                "gpu_memory_utilization",
                "must be in (0, 1]",
            ),
            (self.max_waiting >= 1, "max_waiting", "must be positive"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be positive"),
            (
                self.tensor_parallel_timeout_s > 0,
                "tensor_parallel_timeout_s",
                "must be positive",
            ),
            (self.aging_steps >= 1, "aging_steps", "must be positive"),
            (
                self.contended_prefill_tokens >= 1,
                "contended_prefill_tokens",
                "must be positive",
            ),
            (self.adapter_load_workers >= 1, "adapter_load_workers", "must be positive"),
            (
                self.quantization in (None, "fp8"),
                "quantization",
                "must be unset or fp8",
            ),
            (
                self.quantization is None or self.tensor_parallel_size == 1,
                "quantization",
                "fp8 is not served with tensor_parallel_size > 1 yet",
            ),
            (self.fp8_w8a8_min_tokens >= 1, "fp8_w8a8_min_tokens", "must be positive"),
            (
                self.kv_cache_dtype in KV_CACHE_DTYPES,
                "kv_cache_dtype",
                f"must be one of {', '.join(KV_CACHE_DTYPES)}",
            ),
            (
                self.dtype == "auto" or self.dtype in _DTYPES,
                "dtype",
                f"must be auto or one of {sorted(_DTYPES)}",
            ),
        ]
        for ok, param, msg in checks:
            if not ok:
                raise InvalidRequest(f"{param} {msg}", param=param)
