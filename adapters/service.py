"""Build the adapter components once, in the app lifespan, from the few values they use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.cache import DiskCache
from adapters.fetcher import Fetcher
from adapters.guarded_store import GuardedStore
from adapters.metrics import AdapterMetrics
from adapters.registry import AdapterRegistry
from adapters.spec import BaseModelSpec
from adapters.storage import ObjectStore, S3Options, open_store
from adapters.upload import UploadLimits
from tenancy.breaker import CircuitBreaker
from tenancy.settings import StoreSettings


@dataclass(frozen=True)
class AdapterServices:
    store: ObjectStore
    registry: AdapterRegistry
    cache: DiskCache
    fetcher: Fetcher
    metrics: AdapterMetrics
    limits: UploadLimits


def s3_options(settings: StoreSettings) -> S3Options:
    return S3Options(
        connect_timeout_s=settings.s3_connect_timeout_s,
        read_timeout_s=settings.s3_read_timeout_s,
        max_attempts=settings.s3_max_attempts,
    )


def build_adapter_services(
    sessions: async_sessionmaker[AsyncSession],
    *,
    store_url: str,
    s3_endpoint_url: str | None,
    cache_dir: Path,
    cache_bytes: int,
    spec: Callable[[], BaseModelSpec | None],
    limits: UploadLimits,
    metrics_registry: CollectorRegistry,
    s3: S3Options | None = None,
    store_breaker: CircuitBreaker | None = None,
) -> AdapterServices:
    """``store_breaker``: every store call passes it (:mod:`adapters.guarded_store`)."""
    store: ObjectStore = open_store(store_url, endpoint_url=s3_endpoint_url, s3=s3)
    if store_breaker is not None:
        store = GuardedStore(store, store_breaker)
    metrics = AdapterMetrics(metrics_registry)
    cache = DiskCache(cache_dir, cache_bytes, metrics)
    return AdapterServices(
        store=store,
        registry=AdapterRegistry(sessions, store, spec, max_rank=limits.max_rank),
        cache=cache,
        fetcher=Fetcher(store, cache, metrics, max_bytes=limits.max_expanded_bytes),
        metrics=metrics,
        limits=limits,
    )
