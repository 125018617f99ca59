"""S3 calls are bounded by per-socket-operation timeouts and a bounded number of attempts:
a black-holed or refusing store fails a call within seconds, while a large transfer over a
slow link, much longer than the read timeout, still completes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness.tcp_proxy import ThreadedProxy

from loraplex.adapters.storage import ObjectStore, S3Options, S3Store, StoreError, open_store

OPTIONS = S3Options(connect_timeout_s=0.3, read_timeout_s=0.3, max_attempts=2)


@pytest.fixture
def proxy(s3) -> Iterator[ThreadedProxy]:  # type: ignore[no-untyped-def]
    moto = urlsplit(s3.endpoint_url)
    proxy = ThreadedProxy(moto.hostname or "127.0.0.1", moto.port or 80)
    try:
        yield proxy
    finally:
        proxy.close()


def store_via(proxy: ThreadedProxy, bucket: str, options: S3Options = OPTIONS) -> ObjectStore:
    return open_store(f"s3://{bucket}/p", endpoint_url=f"http://127.0.0.1:{proxy.port}", s3=options)


def slow_store(proxy: ThreadedProxy, bucket: str, read_timeout_s: float) -> S3Store:
    """One PUT and no retries: a timeout anywhere fails the transfer."""
    return S3Store(
        bucket,
        "p",
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        connect_timeout=0.5,
        read_timeout=read_timeout_s,
        max_attempts=1,
        multipart_threshold=64 << 20,
    )


def test_large_transfers_over_a_slow_link_outlast_the_read_timeout(
    s3,
    proxy: ThreadedProxy,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    payload = os.urandom(24 << 20)
    src, dest = tmp_path / "big.tar", tmp_path / "back.tar"
    src.write_bytes(payload)
    proxy.throttle(6 << 20)  # 24 MiB take 4 s each way
    # An upload's read timeout also covers the wait for S3's answer once the body has left
    # for the kernel's send buffer (up to 4 MiB: 0.7 s at this rate) and S3 has stored it
    # (moto, in this busy process): 2 s leave room for both, and are half the transfer.
    started = time.monotonic()
    slow_store(proxy, s3.bucket, 2.0).put_file("blobs/big.tar", src)
    assert time.monotonic() - started > 3.0
    started = time.monotonic()  # a download reads as the bytes come: 0.5 s is plenty
    slow_store(proxy, s3.bucket, 0.5).get_file("blobs/big.tar", dest)
    assert time.monotonic() - started > 3.0
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_every_call_to_an_unreachable_store_is_bounded(
    s3,
    proxy: ThreadedProxy,
    tmp_path: Path,
    mode: str,  # type: ignore[no-untyped-def]
) -> None:
    src = tmp_path / "a.tar"
    src.write_bytes(b"x" * 1000)
    store = store_via(proxy, s3.bucket)
    store.put_file("blobs/a.tar", src)
    proxy.set(mode)
    calls = {
        "put": lambda: store.put_file("blobs/b.tar", src),
        "get": lambda: store.get_file("blobs/a.tar", tmp_path / "a.out"),
        "list": lambda: list(store.list()),
        "delete": lambda: store.delete("blobs/a.tar"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreError):
            call()
        # two attempts of at most connect + read timeouts, and botocore's backoff (< 1 s)
        assert time.monotonic() - started < 4.0, name
    proxy.restore()
    store.get_file("blobs/a.tar", tmp_path / "a.out")
