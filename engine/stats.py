"""A snapshot of the engine's counters, for metrics and readiness. Plain numbers."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class AdapterTierLoads(msgspec.Struct, frozen=True, kw_only=True):
    """Adapter loads from one source tier (``disk``, ``object_store``) into host memory;
    seconds from asked for (request queued) to host-ready, split into queue/fetch/read."""

    count: int = 0
    seconds: float = 0.0
    queue_seconds: float = 0.0
    fetch_seconds: float = 0.0
    read_seconds: float = 0.0
    bytes: int = 0
    buckets: list[tuple[float, int]] = []  # (upper bound s, cumulative count)


class FairKeyStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one fairness key received (engine/fairness.py; at most 64 keys, then ``other``)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    queue_seconds: float = 0.0  # summed over sequences: queued to first scheduled
    queue_steps: int = 0  # the same in scheduler steps (1 each: scheduled at the first step after)
    scheduled: int = 0  # sequences scheduled for the first time
    preemptions: int = 0
    first_token_seconds: float = 0.0  # summed over requests: in the engine to first token
    first_token_steps: int = 0  # the same in scheduler steps
    first_tokens: int = 0  # requests that have their first token


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    num_requests: int = 0  # in flight (added, not yet finished)
    num_waiting: int = 0  # sequences queued (not yet running, or preempted)
    num_running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    last_batch_seqs: int = 0  # sequences in the last step's batch
    last_batch_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0  # computed prompt tokens (cache hits excluded)
    prefix_cache_hit_tokens: int = 0
    generation_tokens: int = 0
    adapter_hits: int = 0  # request's adapter already in a GPU slot on arrival
    adapter_misses: int = 0
    adapter_loads: int = 0  # fetch + read completed
    adapter_load_failures: int = 0
    adapter_evictions: int = 0  # GPU slot evictions
    adapters_loading: int = 0
    adapters_resident: int = 0  # in GPU slots
    adapters_host: int = 0  # loaded in host memory
    adapters_host_bytes: int = 0
    adapters_host_capacity_bytes: int = 0
    adapter_host_evictions: int = 0
    adapter_loads_by_tier: dict[str, AdapterTierLoads] = {}
    adapter_gpu_writes: int = 0  # host weights written into a GPU slot
    adapter_gpu_write_bytes: int = 0
    adapter_gpu_write_seconds: float = 0.0  # the step thread's time issuing them
    lora_slots: int = 0
    # Summed over launched steps: the distinct adapters in each step's batch, and the GPU
    # bytes of their A and B (every layer, as stored in the page pool; a tensor-parallel
    # rank's shard). Each distinct adapter's weights are read at least once a step, beside
    # the base weights: the bytes floor of many adapters (the benchmarks' "bytes bound").
    lora_step_adapters: int = 0
    lora_step_bytes: int = 0
    grammar_compiles: int = 0  # structured outputs: distinct grammars compiled
    grammar_cache_hits: int = 0
    grammars_compiling: int = 0  # requests waiting for their grammar
    grammar_mask_steps: int = 0  # steps with constrained rows
    grammar_mask_rows: int = 0  # masks filled (one per constrained row per step)
    grammar_mask_ms: float = 0.0  # host time filling them and queuing their copy
    fairness: dict[str, FairKeyStats] = {}  # by fairness key (bounded)
    # Adapter keys (bounded by the GPU slots and the batch): what a router reads for
    # affinity, and vLLM's ``lora_requests_info`` labels.
    gpu_adapters: list[str] = []  # in GPU slots
    running_adapters: list[str] = []  # of the running sequences
    waiting_adapters: list[str] = []  # of the queued ones

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class StepCounters:
    """The engine's running totals (step thread only); part of :class:`EngineStats`."""

    steps: int = 0
    last_batch_seqs: int = 0
    last_batch_tokens: int = 0
    prompt_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    generation_tokens: int = 0
    adapter_hits: int = 0
    adapter_misses: int = 0
    adapter_gpu_writes: int = 0
    adapter_gpu_write_bytes: int = 0
    adapter_gpu_write_seconds: float = 0.0
    lora_step_adapters: int = 0
    lora_step_bytes: int = 0
    grammar_mask_steps: int = 0
    grammar_mask_rows: int = 0
    grammar_mask_ms: float = 0.0
