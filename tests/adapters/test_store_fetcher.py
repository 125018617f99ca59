"""Object stores (moto S3 server and a local dir), the disk cache and the fetcher."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from adapter_files import write_lora
from moto_proc import MotoServer
from prometheus_client import CollectorRegistry

from loraplex.adapters.bundle import pack
from loraplex.adapters.cache import DiskCache
from loraplex.adapters.errors import AdapterFetchError
from loraplex.adapters.fetcher import Fetcher
from loraplex.adapters.guarded_store import GuardedStore
from loraplex.adapters.metrics import AdapterMetrics
from loraplex.adapters.storage import LocalStore, ObjectMissing, ObjectStore, S3Store, blob_key
from loraplex.tenancy.breaker import CircuitBreaker


def bundle_of(tmp_path: Path, seed: int = 0, rank: int = 2):  # type: ignore[no-untyped-def]
    src = write_lora(tmp_path / f"src{seed}-{rank}", rank=rank, seed=seed)
    return pack(src, tmp_path / f"b{seed}-{rank}.tar")


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    moto: MotoServer = request.getfixturevalue("moto")
    bucket = request.getfixturevalue("bucket")
    return S3Store(bucket, "pre/fix", endpoint_url=moto.url, multipart_threshold=5 << 20)


def test_put_get_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    b = bundle_of(tmp_path)
    store.put_file(blob_key(b.sha256), b.path)
    store.get_file(blob_key(b.sha256), tmp_path / "back.tar")
    assert (tmp_path / "back.tar").read_bytes() == b.path.read_bytes()
    assert [o.key for o in store.list()] == [blob_key(b.sha256)]
    store.delete(blob_key(b.sha256))
    assert list(store.list()) == []
    with pytest.raises(ObjectMissing):
        store.get_file(blob_key(b.sha256), tmp_path / "gone.tar")


def test_s3_multipart_upload(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (12 << 20))  # 3 parts of 5 MiB
    store = S3Store(bucket, "p", endpoint_url=moto.url, multipart_threshold=5 << 20)
    store.put_file("blobs/big", big)
    assert moto.keys(bucket) == ["p/blobs/big"]
    head = moto.client().head_object(Bucket=bucket, Key="p/blobs/big")
    assert head["ContentLength"] == 12 << 20 and "-" in head["ETag"]  # a multipart ETag


def test_s3_interrupted_upload_leaves_nothing_visible(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    client = moto.client()
    up = client.create_multipart_upload(Bucket=bucket, Key="p/blobs/half")
    client.upload_part(
        Bucket=bucket, Key="p/blobs/half", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100
    )
    assert moto.keys(bucket) == []  # parts of an unfinished upload are invisible
    store = S3Store(bucket, "p", endpoint_url=moto.url)
    assert store.cleanup_incomplete(datetime.now(UTC) + timedelta(seconds=5)) == 1
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_local_store_interrupted_write_invisible(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    (tmp_path / "objects" / ".tmp" / "x.part").write_bytes(b"half")
    assert list(store.list()) == []
    assert store.cleanup_incomplete(datetime.now(UTC) + timedelta(seconds=5)) == 1


def make_fetcher(store: ObjectStore, tmp_path: Path, max_bytes: int = 1 << 30, **kw):  # type: ignore[no-untyped-def]
    metrics = AdapterMetrics(CollectorRegistry())
    cache = DiskCache(tmp_path / "cache", max_bytes, metrics, protect_s=0.0)
    return Fetcher(store, cache, metrics, **kw), metrics


def test_concurrent_cold_fetches_download_once(store: ObjectStore, tmp_path: Path) -> None:
    b = bundle_of(tmp_path)
    store.put_file(blob_key(b.sha256), b.path)
    fetcher, metrics = make_fetcher(store, tmp_path)
    results: list[Path] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        results.append(fetcher.fetch(b.sha256, blob_key(b.sha256)))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetcher.downloads == 1 and len(set(results)) == 1
    assert (results[0] / "adapter_model.safetensors").is_file()
    assert metrics.loads.labels("object_store", "ok")._value.get() == 1
    fetcher.fetch(b.sha256, blob_key(b.sha256))
    assert fetcher.downloads == 1


def test_disk_cache_evicts_lru_by_size(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    bundles = [bundle_of(tmp_path, seed=i) for i in range(4)]
    for b in bundles:
        store.put_file(blob_key(b.sha256), b.path)
    fetcher, metrics = make_fetcher(store, tmp_path)
    fetcher.fetch(bundles[0].sha256, blob_key(bundles[0].sha256))
    one = fetcher.cache.total_bytes  # unpacked size of one adapter
    fetcher.cache.max_bytes = int(2.5 * one)
    for b in bundles[1:3]:
        fetcher.fetch(b.sha256, blob_key(b.sha256))
    assert bundles[0].sha256 not in fetcher.cache and bundles[2].sha256 in fetcher.cache
    fetcher.fetch(bundles[1].sha256, blob_key(bundles[1].sha256))  # hit: 1 is now newest
    fetcher.fetch(bundles[3].sha256, blob_key(bundles[3].sha256))  # evicts 2, keeps 1
    assert bundles[1].sha256 in fetcher.cache and bundles[2].sha256 not in fetcher.cache
    assert fetcher.cache.total_bytes <= 2.5 * one
    assert metrics.evictions.labels("disk")._value.get() == 2
    assert metrics.resident.labels("disk")._value.get() == 2
    # a new cache over the same dir finds what is there
    again = DiskCache(tmp_path / "cache", 1 << 30, AdapterMetrics(CollectorRegistry()))
    assert again.get(bundles[1].sha256) is not None


def test_store_down_breaker_fails_fast_and_recovers(tmp_path: Path) -> None:
    clock = [0.0]
    root = tmp_path / "objects"
    store = LocalStore(root)
    b = bundle_of(tmp_path)
    store.put_file(blob_key(b.sha256), b.path)

    class Flaky:
        """The real store, unreachable while ``down`` (counts the calls that reach it)."""

        def __init__(self) -> None:
            self.down, self.calls = True, 0

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(store, name)

        def get_file(self, key: str, dest: Path) -> None:
            self.calls += 1
            if self.down:
                from loraplex.adapters.storage import StoreError

                raise StoreError("connection refused")
            store.get_file(key, dest)

    flaky = Flaky()
    breaker = CircuitBreaker(
        "object_store", failure_threshold=1, open_s=1.0, clock=lambda: clock[0]
    )
    guarded = GuardedStore(flaky, breaker)  # type: ignore[arg-type]
    fetcher, _ = make_fetcher(guarded, tmp_path)
    for _ in range(5):
        with pytest.raises(AdapterFetchError) as failed:
            fetcher.fetch(b.sha256, blob_key(b.sha256))
        assert failed.value.retry_after == pytest.approx(1.0)
    assert flaky.calls == 1  # the rest failed fast while the breaker was open
    clock[0] = 1.5
    with pytest.raises(AdapterFetchError):
        fetcher.fetch(b.sha256, blob_key(b.sha256))
    assert flaky.calls == 2  # one probe, which failed: open for another second
    clock[0] = 2.0
    with pytest.raises(AdapterFetchError, match=r"retry in 0\.5s"):
        fetcher.fetch(b.sha256, blob_key(b.sha256))
    flaky.down = False
    clock[0] = 2.5  # the store is back: the next fetch probes, and works
    assert (fetcher.fetch(b.sha256, blob_key(b.sha256)) / "adapter_config.json").is_file()
    assert breaker.state == "closed" and flaky.calls == 3


def test_corrupt_object_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    b = bundle_of(tmp_path)
    other = bundle_of(tmp_path, seed=1)
    store.put_file(blob_key(b.sha256), other.path)  # wrong bytes under this hash
    fetcher, _ = make_fetcher(store, tmp_path)
    with pytest.raises(AdapterFetchError, match="corrupt"):
        fetcher.fetch(b.sha256, blob_key(b.sha256))
