"""Settings shared by every service that touches the stores (database, Redis, objects).

Embedded mode (no ``LORAPLEX_DATABASE_URL``): SQLite and a local object directory under
``LORAPLEX_DATA_DIR``, no Redis, a secret key generated once and kept in the data dir.
Production mode (a database URL is set, or ``LORAPLEX_MODE=production``): secrets must be
given and must not be placeholders. Service classes (``GatewaySettings``...) extend this.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, PositiveFloat, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from loraplex.tenancy.db import DbTimeouts

PLACEHOLDERS = {"", "changeme", "change-me", "change_me", "secret", "placeholder", "xxx", "todo"}
MIN_SECRET_LEN = 16


class ConfigError(ValueError):
    """A setting is wrong; ``setting`` names the environment variable."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def _is_placeholder(value: str) -> bool:
    v = value.strip().lower()
    return v in PLACEHOLDERS or v.startswith("changeme") or len(v) < MIN_SECRET_LEN


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", env_file=".env", extra="ignore")

    mode: Literal["auto", "embedded", "production"] = "auto"
    data_dir: Path = Path(".loraplex")
    database_url: str | None = None
    redis_url: str | None = None
    object_store_url: str | None = None
    s3_endpoint_url: str | None = None
    admin_token: str | None = None
    secret_key: str | None = Field(default=None, repr=False)
    # Every store call is bounded: an unreachable store costs a timeout, never a hang.
    db_connect_timeout_s: PositiveFloat = 3.0
    db_statement_timeout_s: PositiveFloat = 5.0  # server-side; also SQLite's busy timeout
    db_pool_timeout_s: PositiveFloat = 3.0  # wait for a free pooled connection
    s3_connect_timeout_s: PositiveFloat = 2.0
    s3_read_timeout_s: PositiveFloat = 5.0  # per socket read/write, not per transfer
    s3_max_attempts: int = Field(default=2, ge=1, le=10)  # per call, the first included

    @property
    def embedded(self) -> bool:
        if self.mode == "auto":
            return self.database_url is None
        return self.mode == "embedded"

    @model_validator(mode="after")
    def _check(self) -> StoreSettings:
        if self.database_url is not None:
            try:
                make_url(self.database_url)
            except (ArgumentError, ValueError) as exc:
                raise ConfigError("LORAPLEX_DATABASE_URL", f"not a valid URL ({exc})") from None
            scheme = urlparse(self.database_url).scheme
            if scheme not in {"postgresql+asyncpg", "sqlite+aiosqlite"}:
                raise ConfigError(
                    "LORAPLEX_DATABASE_URL",
                    f"unsupported scheme {scheme!r}: use postgresql+asyncpg://... "
                    "or sqlite+aiosqlite:///path",
                )
        if self.redis_url is not None and urlparse(self.redis_url).scheme not in {
            "redis",
            "rediss",
            "unix",
        }:
            raise ConfigError(
                "LORAPLEX_REDIS_URL", "must start with redis://, rediss:// or unix://"
            )
        if self.object_store_url is not None and urlparse(self.object_store_url).scheme not in {
            "s3",
            "file",
        }:
            raise ConfigError(
                "LORAPLEX_OBJECT_STORE_URL", "must be s3://bucket/prefix or file:///dir"
            )
        if not self.embedded:
            if self.secret_key is None or _is_placeholder(self.secret_key):
                raise ConfigError(
                    "LORAPLEX_SECRET_KEY",
                    f"set a random secret of at least {MIN_SECRET_LEN} characters in "
                    "production mode (e.g. `openssl rand -hex 32`)",
                )
            if self.admin_token is not None and _is_placeholder(self.admin_token):
                raise ConfigError(
                    "LORAPLEX_ADMIN_TOKEN", "placeholder or short token refused in production mode"
                )
        return self

    # Resolved values: embedded defaults fill what production mode must set explicitly.

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'loraplex.db').resolve()}"

    def resolved_object_store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        return (self.data_dir / "objects").resolve().as_uri()

    def db_timeouts(self) -> DbTimeouts:
        return DbTimeouts(
            connect_s=self.db_connect_timeout_s,
            statement_s=self.db_statement_timeout_s,
            pool_checkout_s=self.db_pool_timeout_s,
        )

    def resolved_secret_key(self) -> str:
        """The configured key, or (embedded only) one generated once into the data dir."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()
