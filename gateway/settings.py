"""Settings of the data-plane process (gateway + admin + in-process engine in `serve`)."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Literal

from pydantic import Field, PositiveFloat

from loraplex.admin.settings import AdminAuthSettings
from loraplex.tenancy.settings import StoreSettings


class GatewaySettings(StoreSettings, AdminAuthSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    # Model spec: "" = the embedded SmolLM2 GGUF; a HF directory; a .gguf file; dummy:<preset>.
    model: str = ""
    served_model_name: str | None = None
    # how chat output is read for tool calls; None: chosen from the model's chat template
    tool_call_parser: Literal["hermes", "llama3_json"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # "fp8": the base model's projections quantized to e4m3 at load (per-channel scales);
    # FP8 checkpoints (quant_method fp8, compressed-tensors) load as FP8 regardless
    quantization: Literal["fp8"] | None = None
    # FP8 projections: W8A8 (torch._scaled_mm) from this many tokens in a step, the
    # weight-only FP8 kernel below
    fp8_w8a8_min_tokens: int = Field(default=1, ge=1)
    # "fp8": the KV cache in e4m3 (scale 1): twice the tokens in the same memory
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # measured kernel launch configs, one JSON file per GPU model (default
    # <data_dir>/kernel-configs); kernel_tuning: the warm-up measures missing shapes
    kernel_config_dir: Path | None = None
    kernel_tuning: bool = True
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # several tenants active: the prefill a step gives the tenants holding more than their
    # share of the batch (at or above max_num_batched_tokens: no bound; docs/fairness.md)
    contended_prefill_tokens: int = Field(default=2048, ge=1)
    # GPU adapter memory (pages of rank rows): bytes, or None for lora_memory_fraction of
    # the GPU memory left after the weights. How many adapters are resident follows from it.
    lora_memory_bytes: int | None = Field(default=None, gt=0)
    lora_memory_fraction: float = Field(default=0.2, gt=0, lt=1)
    max_loras: int | None = Field(default=None, ge=1)  # deprecated: a cap on resident adapters
    max_lora_rank: int = 64
    # Adapter host tier (loaded, validated weights in host memory): bytes, or None for
    # host_lora_memory_fraction of the machine's (or cgroup's) memory; loader threads.
    host_lora_bytes: int | None = Field(default=None, gt=0)
    host_lora_memory_fraction: float = Field(default=0.2, gt=0, le=0.9)
    adapter_load_workers: int = Field(default=4, ge=1, le=64)
    async_scheduling: bool = True  # launch step n+1 before reading step n's tokens
    # prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs (GPU);
    # larger ones run eagerly. 0: none
    prefill_graph_tokens: int = Field(default=1024, ge=0)
    # split the model over this many GPUs of one host (one worker process per extra rank)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    kv_cache_bytes: int = 512 * 1024 * 1024
    gpu_memory_utilization: float = 0.9
    # Processes: the engine server the gateway talks to (None: `serve` starts its own), the
    # shared token that engine requires, and how many gateway worker processes serve HTTP.
    engine_url: str | None = None
    engine_listen: str = "tcp://127.0.0.1:7700"  # `loraplex engine`'s address
    engine_token: str | None = Field(default=None, repr=False)
    # `loraplex engine`'s HTTP surface (host:port): /metrics under vLLM's names, /health,
    # /ready, POST /v1/load_lora_adapter and /v1/unload_lora_adapter. None: none.
    engine_http: str | None = None
    # `loraplex engine` on SIGTERM: takes nothing new (a router sends it elsewhere) and gives
    # what runs this long to finish; 0: aborts what runs at once.
    engine_drain_grace_s: float = Field(default=0.0, ge=0)
    # Several engine replicas (gateway.routed_client): a comma-separated list of addresses,
    # or a DNS name host:port whose A/AAAA records are the replicas (a Kubernetes headless
    # Service), resolved every engine_dns_refresh_s. Requests go to a replica holding their
    # adapter, else to the adapter's hash home, with no replica taking more than
    # engine_load_factor x the mean of requests in flight (nor fewer than engine_load_floor:
    # below that the engine batches them anyway); a replica that failed a request is left
    # out for engine_eject_s.
    engine_urls: str | None = None
    engine_dns: str | None = None
    engine_dns_refresh_s: PositiveFloat = 5.0
    engine_load_factor: float = Field(default=1.25, ge=1.0)
    engine_load_floor: int = Field(default=8, ge=1)
    engine_eject_s: float = Field(default=5.0, ge=0)
    workers: int | None = Field(default=None, ge=1, le=64)  # None: from the core count
    # SIGTERM (gateway.drain): for drain_delay_s the worker answers /ready and new requests
    # with 503 (the listener stays open while the load balancer takes the pod out); then
    # it stops accepting and the requests in flight, streams too, get drain_grace_s to end.
    drain_delay_s: float = Field(default=0.0, ge=0)
    drain_grace_s: int = Field(default=30, ge=0)
    # An idle client connection stays open this long. Above the idle timeout of the load
    # balancers in front (60 s on AWS's and nginx's): the side that closes first must be the
    # client's, or a request sent on a connection the server is closing at that moment is
    # lost ("server disconnected"). uvicorn's own default is 5 s.
    keep_alive_s: int = Field(default=65, ge=1)
    access_log: bool = True  # a log line per request: id, tenant, model, status, tokens, latency
    log_format: Literal["text", "json"] = "text"  # every process's log lines (gateway.log_format)
    # HTTP limits
    max_body_bytes: int = 4 * 1024 * 1024
    # /v1/embeddings: tokens over all the inputs of one request (OpenAI's limit)
    embedding_max_tokens: int = Field(default=300_000, ge=1)
    # Adapters: upload cap (multipart body; an archive's contents get twice this), disk cache.
    adapter_upload_max_bytes: int = 1024 * 1024 * 1024
    adapter_cache_dir: Path | None = None  # default: <data_dir>/adapter-cache
    adapter_cache_bytes: int = 20 * 1024 * 1024 * 1024
    # Auth cache TTL: revocations reach every replica within this many seconds.
    key_cache_ttl_s: float = 5.0
    # Model resolution cache TTL: an adapter request's model is looked up in the database at
    # most this often per worker; uploads, deletes and alias moves reach other workers and
    # replicas within this many seconds (their own worker's next request at once). 0: every
    # request asks the database.
    model_cache_ttl_s: float = Field(default=5.0, ge=0)
    # Database unreachable: keys seen before keep authenticating from their last known
    # state, and models resolved before keep resolving, for this long after their TTL.
    key_cache_stale_s: float = Field(default=300.0, ge=0)
    model_cache_stale_s: float = Field(default=300.0, ge=0)
    # Circuit breakers (database, object store): this many consecutive failures open one;
    # calls then fail at once for breaker_open_s, after which one probe call may close it.
    breaker_failure_threshold: int = Field(default=3, ge=1)
    breaker_open_s: PositiveFloat = 2.0
    migrate_on_start: bool = True
    # Limits (gateway.limits): Redis when LORAPLEX_REDIS_URL is set; else the limits broker
    # of this process's supervisor when it set LORAPLEX_LIMITS_BROKER_URL (several gateway
    # workers, internal); else in-process. The store (Redis or the broker) unreachable:
    # request rates fail open, budgets fail closed (503), by default.
    limits_rates_fail_open: bool = True
    limits_budgets_fail_open: bool = False
    limits_lease_s: float = 600.0  # a concurrency slot not settled by then frees itself
    limits_redis_timeout_s: float = 1.0  # also the broker's; a busy event loop is no outage
    limits_broker_url: str | None = None  # internal: set by `serve`/`gateway` for workers
    # Budget counters raised to the ledger's month totals this often (0: never).
    limits_budget_sync_s: float = 300.0
    # Metering (gateway.ledger): the durable outbox, drained into the database.
    ledger_outbox_path: Path | None = None  # default: <data_dir>/usage-outbox-<db>.sqlite
    ledger_batch_size: int = 500
    # A request's usage is in the outbox before its response finishes, safe from a crash of
    # any process. "response": also fsynced by then (safe from an OS crash or power loss,
    # an fsync per request's latency); "background": fsynced within ~50 ms after.
    ledger_fsync: Literal["response", "background"] = "background"
    # Metrics: per-tenant labels multiply series by the number of tenants; off by default.
    metrics_tenant_labels: bool = False
    # Daily usage export (exports/dt=YYYY-MM-DD/usage.parquet), after this hour (UTC).
    # None: on when usage_export_url is set or the object store is on S3.
    usage_export_enabled: bool | None = None
    usage_export_url: str | None = None  # s3://bucket/prefix or file:///dir; default: object store
    usage_export_after_hour_utc: int = Field(default=1, ge=0, le=23)

    def base_model_name(self) -> str:
        """The base model's id in the API (and what adapter versions record as their base):
        ``served_model_name``, else ``base`` for the embedded default, ``dummy:<preset>`` as
        given, or a path's last part without ``.gguf`` and a quantization suffix
        (``/m/Llama-3-8B.Q4_K_M.gguf`` -> ``Llama-3-8B``)."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return "base"
        if self.model.startswith("dummy:"):
            return self.model
        name = PurePath(self.model.rstrip("/")).name
        if name.lower().endswith(".gguf"):
            name = re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", name[: -len(".gguf")], flags=re.I)
        return name or "base"
