"""The engine's signals under vLLM's Prometheus names, in the text format, so that routers
built for vLLM (the Gateway API Inference Extension's endpoint picker, llm-d) read an
engine pod with no code of ours. Plain values in, bytes out; no prometheus_client here.

- ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` / ``vllm:kv_cache_usage_perc``
  (a fraction, 0..1, as vLLM reports it), labelled ``model_name`` and ``engine``;
- ``vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}``: a gauge
  whose value is the time of the snapshot (seconds since the epoch), the adapters as
  comma-separated names, as vLLM defines it;
- ``vllm:lora_adapter_loaded{adapter_name,level,pinned}`` (vLLM PR #45411's shape): one
  series per adapter and tier, ``level`` ``gpu`` (in a GPU slot) or ``cpu`` (our host
  tier), ``pinned`` ``true`` while running requests use it (it cannot be evicted then);
  ``vllm:num_gpu_loaded_lora_adapters`` / ``vllm:num_cpu_loaded_lora_adapters`` count them.

Adapter names are the engine's adapter keys (content hashes, as the gateway sends them,
or the ``lora_name`` given to ``POST /v1/load_lora_adapter``).
"""

from __future__ import annotations

from loraplex.engine.api import AdapterResidency
from loraplex.engine.stats import EngineStats


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, doc: str, samples: list[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {float(value)!r}")


def render(
    stats: EngineStats,
    residency: AdapterResidency | None,
    *,
    model_name: str,
    now: float,
) -> bytes:
    """The vLLM families for one snapshot. ``residency`` None: the per-adapter families
    are left out (the engine did not answer in time)."""
    out = _Text()
    base = {"model_name": model_name, "engine": "0"}
    out.family(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(base, stats.num_running)],
    )
    out.family(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(base, stats.num_waiting)],
    )
    out.family(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        [(base, stats.kv_usage)],
    )
    info = {
        "max_lora": str(stats.lora_slots),
        "running_lora_adapters": ",".join(stats.running_adapters),
        "waiting_lora_adapters": ",".join(stats.waiting_adapters),
    }
    out.family("vllm:lora_requests_info", "Running stats on lora requests.", [(info, now)])
    if residency is not None:
        running = set(stats.running_adapters)
        loaded: list[tuple[dict[str, str], float]] = []
        for level, keys in (("gpu", residency.gpu), ("cpu", residency.host)):
            for key in sorted(keys):
                pinned = "true" if key in running else "false"
                loaded.append(({"adapter_name": key, "level": level, "pinned": pinned}, 1.0))
        out.family(
            "vllm:lora_adapter_loaded",
            "LoRA adapters loaded, one series per adapter and level (gpu or cpu).",
            loaded,
        )
        out.family(
            "vllm:num_gpu_loaded_lora_adapters",
            "Number of LoRA adapters loaded in GPU memory.",
            [({}, len(residency.gpu))],
        )
        out.family(
            "vllm:num_cpu_loaded_lora_adapters",
            "Number of LoRA adapters loaded in CPU memory.",
            [({}, len(residency.host))],
        )
    return ("\n".join(out.lines) + "\n").encode()
