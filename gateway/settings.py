"""Settings of the data-plane process (gateway + admin + in-process engine in `serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tenancy.settings import StoreSettings


class GatewaySettings(StoreSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    # Model spec: "" = the embedded SmolLM2 GGUF; a HF directory; a .gguf file; dummy:<preset>.
    model: str = ""
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_loras: int = 8
    max_lora_rank: int = 64
    kv_cache_bytes: int = 512 * 1024 * 1024
    gpu_memory_utilization: float = 0.9
    # HTTP limits
    max_body_bytes: int = 4 * 1024 * 1024
    # Adapters: upload cap (multipart body; an archive's contents get twice this), disk cache.
    adapter_upload_max_bytes: int = 1024 * 1024 * 1024
    adapter_cache_dir: Path | None = None  # default: <data_dir>/adapter-cache
    adapter_cache_bytes: int = 20 * 1024 * 1024 * 1024
    # Auth cache TTL: revocations reach every replica within this many seconds.
    key_cache_ttl_s: float = 5.0
    migrate_on_start: bool = True
