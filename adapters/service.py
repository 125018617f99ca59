"""Build the adapter components once, from the few values they use.

The gateway and admin side gets the store, the registry and upload limits
(:func:`build_adapter_services`); the engine side gets the fetcher that turns a content key
and an object key into a local directory through its own disk cache (:func:`build_fetcher`),
both from the same object-store settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.cache import DiskCache
from adapters.fetcher import Fetcher
from adapters.metrics import AdapterMetrics
from adapters.registry import AdapterRegistry
from adapters.spec import BaseModelSpec
from adapters.storage import ObjectStore, open_store
from adapters.upload import UploadLimits


@dataclass(frozen=True)
class AdapterServices:
    store: ObjectStore
    registry: AdapterRegistry
    limits: UploadLimits


def build_adapter_services(
    sessions: async_sessionmaker[AsyncSession],
    *,
    store_url: str,
    s3_endpoint_url: str | None,
    spec: Callable[[], BaseModelSpec | None],
    limits: UploadLimits,
) -> AdapterServices:
    store = open_store(store_url, endpoint_url=s3_endpoint_url)
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
) -> Fetcher:
    """The engine side's fetcher: object store -> disk cache -> a local PEFT directory."""
    metrics = AdapterMetrics(metrics_registry)
    store = open_store(store_url, endpoint_url=s3_endpoint_url)
    return Fetcher(store, DiskCache(cache_dir, cache_bytes, metrics), metrics, max_bytes=max_bytes)
