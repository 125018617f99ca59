"""Build the adapter components once, from the few values they use.

The gateway and admin side gets the store, the registry and upload limits
(:func:`build_adapter_services`); the engine side gets the fetcher that turns a content key
and an object key into a local directory through its own disk cache (:func:`build_fetcher`),
both from the same object-store settings, each behind a circuit breaker of its process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.cache import DiskCache
from loraplex.adapters.fetcher import Fetcher
from loraplex.adapters.guarded_store import GuardedStore
from loraplex.adapters.metrics import AdapterMetrics
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.spec import BaseModelSpec
from loraplex.adapters.storage import ObjectStore, S3Options, open_store
from loraplex.adapters.upload import UploadLimits
from loraplex.tenancy.breaker import CircuitBreaker
from loraplex.tenancy.settings import StoreSettings


@dataclass(frozen=True)
class AdapterServices:
    store: ObjectStore
    registry: AdapterRegistry
    limits: UploadLimits


def s3_options(settings: StoreSettings) -> S3Options:
    return S3Options(
        connect_timeout_s=settings.s3_connect_timeout_s,
        read_timeout_s=settings.s3_read_timeout_s,
        max_attempts=settings.s3_max_attempts,
    )


def _store(
    url: str, endpoint_url: str | None, s3: S3Options | None, breaker: CircuitBreaker | None
) -> ObjectStore:
    """``breaker``: every store call passes it (:mod:`adapters.guarded_store`)."""
    store: ObjectStore = open_store(url, endpoint_url=endpoint_url, s3=s3)
    return store if breaker is None else GuardedStore(store, breaker)


def build_adapter_services(
    sessions: async_sessionmaker[AsyncSession],
    *,
    store_url: str,
    s3_endpoint_url: str | None,
    spec: Callable[[], BaseModelSpec | None],
    limits: UploadLimits,
    s3: S3Options | None = None,
    store_breaker: CircuitBreaker | None = None,
) -> AdapterServices:
    store = _store(store_url, s3_endpoint_url, s3, store_breaker)
    return AdapterServices(
        store=store,
        registry=AdapterRegistry(sessions, store, spec, max_rank=limits.max_rank),
        limits=limits,
    )


def build_fetcher(
    *,
    store_url: str,
    s3_endpoint_url: str | None,
    cache_dir: Path,
    cache_bytes: int,
    max_bytes: int,
    metrics_registry: CollectorRegistry,
    s3: S3Options | None = None,
    store_breaker: CircuitBreaker | None = None,
) -> Fetcher:
    """The engine side's fetcher: object store -> disk cache -> a local PEFT directory."""
    metrics = AdapterMetrics(metrics_registry)
    store = _store(store_url, s3_endpoint_url, s3, store_breaker)
    return Fetcher(store, DiskCache(cache_dir, cache_bytes, metrics), metrics, max_bytes=max_bytes)
