"""One live gateway for the outage tests (a real uvicorn server, the tiny Llama in the
in-process engine), with PostgreSQL, Redis and S3 behind proxies and short timeouts so
that an outage test takes seconds. Every test ends with every proxy forwarding again and
the gateway ready."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import httpx
import openai
import pytest
from harness.tcp_proxy import ThreadedProxy
from outage_live import OutageGateway, Proxies
from sqlalchemy.engine import make_url

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import BASE, Gateway, fresh_database, live_server, ok, wait_until

T = TypeVar("T")

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def fast_settings(**kw: object) -> GatewaySettings:
    """Short timeouts: an outage costs tests fractions of a second per call."""
    return GatewaySettings(
        served_model_name=BASE,
        key_cache_ttl_s=0.3,  # most requests during an outage find their key stale
        key_cache_stale_s=120,
        model_cache_stale_s=120,
        db_connect_timeout_s=0.5,
        db_statement_timeout_s=0.5,
        db_pool_timeout_s=0.5,
        s3_connect_timeout_s=0.5,
        s3_read_timeout_s=0.5,
        s3_max_attempts=2,
        breaker_failure_threshold=2,
        breaker_open_s=2.0,
        limits_redis_timeout_s=0.2,
        limits_budget_sync_s=0,
        usage_export_enabled=False,
        **kw,  # type: ignore[arg-type]
    )


def until_available(setup: Callable[[], T], within_s: float = 30.0) -> T:
    """Run a setup step again while the gateway answers 503: with the fast settings a
    database call past 0.5 s on a loaded box counts as a failure, and two open the breaker
    for 2 s (a fast 503, as designed), before any outage is staged."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return setup()
        except (AssertionError, openai.APIStatusError) as exc:
            busy = getattr(exc, "status_code", 503) == 503 and "unavailable" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="package")
def outage_gw(
    tiny_llama_dir: Path,
    make_peft_adapter: Callable[..., Path],
    redis_url: str,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OutageGateway]:
    token = secrets.token_hex(16)
    config = EngineConfig(device="cpu", max_num_seqs=8, num_gpu_blocks=256, max_loras=2)
    bucket = f"outages-{secrets.token_hex(4)}"
    moto = urlsplit(s3_endpoint)
    with pytest.MonkeyPatch.context() as env, fresh_database() as url:
        for name, value in AWS.items():
            env.setenv(name, value)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        pg, rd = make_url(url), urlsplit(redis_url)
        proxies = Proxies(
            db=ThreadedProxy(pg.host or "127.0.0.1", pg.port or 5432),
            redis=ThreadedProxy(rd.hostname or "127.0.0.1", rd.port or 6379),
            s3=ThreadedProxy(moto.hostname or "127.0.0.1", moto.port or 80),
        )
        settings = fast_settings(
            database_url=pg.set(port=proxies.db.port).render_as_string(hide_password=False),
            redis_url=f"redis://127.0.0.1:{proxies.redis.port}{rd.path}",
            object_store_url=f"s3://{bucket}/lpx",
            s3_endpoint_url=f"http://127.0.0.1:{proxies.s3.port}",
            admin_token=token,
            secret_key=secrets.token_hex(32),
            data_dir=tmp_path_factory.mktemp("outages"),
            model=str(tiny_llama_dir),
        )
        app = create_app(
            settings, engine_factory=lambda: inproc_engine(settings, str(tiny_llama_dir), config)
        )
        try:
            with live_server(app) as base:
                with httpx.Client() as probe:
                    wait_until(lambda: probe.get(f"{base}/ready").status_code == 200, 120)
                gw = Gateway(url=base, app=app, database_url=url, admin_token=token)
                og = OutageGateway(gw, proxies, make_peft_adapter(tiny_llama_dir, rank=4, seed=71))
                warm = until_available(lambda: og.tenant(adapters={"warm": og.warm_dir}))
                until_available(lambda: og.chat(warm, "warm"))  # its bytes: in the disk cache
                yield og
        finally:
            for proxy in proxies.all():
                proxy.close()


@pytest.fixture
def og(outage_gw: OutageGateway) -> Iterator[OutageGateway]:
    yield outage_gw
    for proxy in outage_gw.proxies.all():
        proxy.restore()
    with httpx.Client(base_url=outage_gw.url) as c:
        wait_until(lambda: c.get("/ready").status_code == 200, 30)
        ok(c.get("/health"))


@pytest.fixture(params=["refuse", "blackhole"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)
