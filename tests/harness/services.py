"""Real services for tests: PostgreSQL, Redis and an S3 server (moto), started when absent.

PostgreSQL and Redis are the machine's own servers (127.0.0.1:5432 trust auth, :6379); when
one is not answering, it is started the way the dev machines run it. Each test run gets its
own PostgreSQL database (``lpx_test_<pid>_<hex>``, dropped at the end) and its own Redis DB
index (claimed in DB 0 with SET NX, so concurrent runs on one machine don't collide).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get(
    "LORAPLEX_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE_URL = os.environ.get("LORAPLEX_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


class ServiceUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(host, port):
            return True
        time.sleep(0.2)
    return False


def _start(what: str, argv: list[str], host: str, port: int) -> None:
    if reachable(host, port):
        return
    if shutil.which(argv[0]) is None:
        raise ServiceUnavailable(
            f"{what} is not running on {host}:{port} and `{argv[0]}` is not installed "
            "(run `bash .ci/run`, which installs it, or start it yourself)"
        )
    subprocess.run(argv, check=False, capture_output=True, timeout=60)
    if not wait_port(host, port, 30):
        raise ServiceUnavailable(f"{what} did not come up on {host}:{port} ({' '.join(argv)})")


def ensure_postgres() -> None:
    url = make_url(PG_ADMIN_URL)
    host, port = url.host or "127.0.0.1", url.port or 5432
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    version = versions[-1] if versions else "15"
    argv = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"]
    _start("PostgreSQL", argv, host, port)


def ensure_redis() -> None:
    url = urlparse(REDIS_BASE_URL)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    for d in ("/var/lib/redis", "/var/log/redis"):
        Path(d).mkdir(parents=True, exist_ok=True)
    _start("Redis", REDIS_START, host, port)


# ---- PostgreSQL: one database per test run ------------------------------------------------


def _conninfo(url: str, database: str | None = None) -> str:
    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_database() -> str:
    """A fresh, empty database; returns its asyncpg URL. Drops leftovers of dead runs."""
    import psycopg

    name = f"lpx_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(_conninfo(PG_ADMIN_URL), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'lpx\\_test\\_%'"
        ).fetchall()
        for (old,) in rows:
            pid = old.split("_")[2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                conn.execute(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    import psycopg

    name = make_url(url).database
    with psycopg.connect(_conninfo(PG_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate_all(url: str, tables: list[str]) -> None:
    import psycopg

    if not tables:
        return
    quoted = ", ".join(f'"{t}"' for t in tables)
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute("SET lock_timeout = '20s'")
        conn.execute(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE")


def migrate(url: str) -> None:
    """Alembic upgrade head, in a worker thread (safe even inside a running event loop)."""
    from loraplex.migrations.runner import upgrade

    with ThreadPoolExecutor(1) as pool:
        pool.submit(upgrade, url).result()


# ---- Redis: one DB index per test run ------------------------------------------------------


def claim_redis_db() -> int:
    import redis

    client = redis.Redis.from_url(f"{REDIS_BASE_URL}/0")
    try:
        for index in range(1, 16):
            if client.set(f"loraplex:test-db:{index}", os.getpid(), nx=True, ex=6 * 3600):
                return index
            owner = client.get(f"loraplex:test-db:{index}")
            if owner is not None and owner.isdigit() and not _pid_alive(int(owner)):
                client.set(f"loraplex:test-db:{index}", os.getpid(), ex=6 * 3600)
                return index
    finally:
        client.close()
    raise ServiceUnavailable("all Redis DB indexes 1..15 are claimed by running test sessions")


def release_redis_db(index: int) -> None:
    import redis

    client = redis.Redis.from_url(f"{REDIS_BASE_URL}/0")
    try:
        client.delete(f"loraplex:test-db:{index}")
    finally:
        client.close()


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
