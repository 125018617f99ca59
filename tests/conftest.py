"""The shared test harness: real PostgreSQL, Redis and S3 (moto), tiny offline models.

Fixtures (use them by name):

- ``pg_url``: asyncpg URL of a PostgreSQL database made for this test run, migrated to head
  (dropped at the end); its tables are emptied before each test that uses it.
  ``pg_database`` is the same URL session-scoped (no truncation), for session fixtures.
- ``sqlite_url``: aiosqlite URL of a fresh migrated SQLite file in the test's tmp dir.
- ``redis_url``: ``redis://127.0.0.1:6379/<n>``, a DB index of its own for this run;
  session-scoped, flushed before every test that uses it.
- ``s3``: an ``S3`` (``endpoint_url``, ``bucket``, ``region``, ``access_key``,
  ``secret_key``) on a moto server, with a fresh bucket per test; AWS_* env vars are set.
- ``tiny_llama_dir``: a random 2-layer Llama with tokenizer and chat template (offline).
- ``make_peft_adapter(base_dir, rank, targets, seed, alpha=None) -> Path``: a PEFT LoRA dir
  with randomized ``lora_B`` (so it changes outputs); cached per argument set.
- ``free_port``: an unused TCP port on 127.0.0.1.

Markers: ``gpu`` (skipped unless CUDA is available; run ``pytest -m gpu`` on a GPU machine)
and ``slow``. Missing PostgreSQL/Redis servers are started on demand (see harness.services).
LORAPLEX_* variables of the caller's environment are removed for the run (hermetic tests);
without CUDA, TRITON_INTERPRET=1 is set before anything imports triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import models, services

for _name in [n for n in os.environ if n.startswith("LORAPLEX_") and "_TEST_" not in n]:
    del os.environ[_name]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Without a GPU, Triton kernels run in its interpreter; this must be set before anything
# imports triton (kernel tests and the engine modules other tests import share it).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def free_port() -> int:
    return services.free_port()


# ---- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    try:
        services.ensure_postgres()
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    url = services.create_database()
    try:
        services.migrate(url)
        yield url
    finally:
        services.drop_database(url)


@pytest.fixture
def pg_url(pg_database: str) -> str:
    from loraplex.tenancy.models import Base

    services.truncate_all(pg_database, [t.name for t in Base.metadata.sorted_tables])
    return pg_database


# ---- SQLite --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "loraplex.db"
    services.migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "loraplex.db"
    path.write_bytes(_sqlite_template.read_bytes())
    return f"sqlite+aiosqlite:///{path}"


# ---- Redis ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        services.ensure_redis()
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    index = services.claim_redis_db()
    url = f"{services.REDIS_BASE_URL}/{index}"
    services.flush_redis(url)
    try:
        yield url
    finally:
        services.flush_redis(url)
        services.release_redis_db(index)


@pytest.fixture(autouse=True)
def _flush_redis(request: pytest.FixtureRequest) -> None:
    """Empty the run's Redis DB before each test that uses ``redis_url``."""
    if "redis_url" in request.fixturenames:
        services.flush_redis(request.getfixturevalue("redis_url"))


# ---- S3 (moto) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    bucket: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server for the whole run (in a thread of this process)."""
    from moto.server import ThreadedMotoServer

    port = services.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> S3:
    import re
    import secrets

    slug = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-")
    store = S3(endpoint_url=s3_endpoint, bucket=f"lpx-{slug}-{secrets.token_hex(4)}")
    for name, value in {
        "AWS_ACCESS_KEY_ID": store.access_key,
        "AWS_SECRET_ACCESS_KEY": store.secret_key,
        "AWS_DEFAULT_REGION": store.region,
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    store.client().create_bucket(Bucket=store.bucket)
    return store


# ---- Tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_llama(tmp_path_factory.mktemp("tiny-llama"))


MakeAdapter = Callable[..., Path]


@pytest.fixture(scope="session")
def make_peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> MakeAdapter:
    made: dict[tuple[str, int, tuple[str, ...], int, int | None], Path] = {}

    def make(
        base_dir: Path,
        rank: int = 8,
        targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
        seed: int = 0,
        alpha: int | None = None,
    ) -> Path:
        key = (str(base_dir), rank, tuple(targets), seed, alpha)
        if key not in made:
            out = tmp_path_factory.mktemp(f"lora-r{rank}-s{seed}")
            made[key] = models.build_peft_adapter(
                Path(base_dir), out, rank=rank, targets=list(targets), seed=seed, alpha=alpha
            )
        return made[key]

    return make
