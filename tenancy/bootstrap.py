"""First start: a ``default`` tenant with an all-scopes API key, and (when no
``LORAPLEX_ADMIN_TOKEN`` is configured) an admin token. Secrets are returned once for the
operator to copy; only keyed hashes are stored. Later starts create nothing.

The gateway's admin authentication checks a presented token with :func:`verify_admin_token`.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.tenancy.keys import generate_key, hash_secret
from loraplex.tenancy.models import AdminToken, ApiKey, AuditLog, Tenant
from loraplex.tenancy.principal import SCOPES

DEFAULT_TENANT = "default"
BOOTSTRAP_NAME = "bootstrap"
ADMIN_TOKEN_PREFIX = "lpxadm_"
ACTOR = "system:bootstrap"


@dataclass(frozen=True)
class BootstrapResult:
    """What this start created; the secrets are set only when they were just made."""

    tenant_created: bool
    api_key: str | None = None
    admin_token: str | None = None

    def banner(self) -> str:
        """Text for the operator (printed once), or "" when nothing was created."""
        lines = []
        if self.api_key is not None:
            lines += [
                f"Created tenant {DEFAULT_TENANT!r} with an API key (all scopes).",
                f"  API key:     {self.api_key}",
            ]
        if self.admin_token is not None:
            lines.append(f"  Admin token: {self.admin_token}")
        if lines:
            lines.append("Store these now: they are shown once and only their hashes are kept.")
        return "\n".join(lines)


def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


async def _create_default_tenant(session: AsyncSession, secret_key: str) -> str | None:
    if await session.scalar(select(Tenant.id).where(Tenant.name == DEFAULT_TENANT)):
        return None
    tenant = Tenant(name=DEFAULT_TENANT)
    session.add(tenant)
    await session.flush()
    prefix, secret, full_key = generate_key()
    session.add(
        ApiKey(
            tenant_id=tenant.id,
            name=BOOTSTRAP_NAME,
            prefix=prefix,
            secret_hash=hash_secret(secret_key, secret),
            scopes=list(SCOPES),
        )
    )
    session.add(AuditLog(actor=ACTOR, action="tenant.create", tenant_id=tenant.id,
                         target=DEFAULT_TENANT, detail={"api_key_prefix": prefix}))  # fmt: skip
    return full_key


async def _create_admin_token(session: AsyncSession, secret_key: str) -> str | None:
    if await session.scalar(select(AdminToken.id).where(AdminToken.name == BOOTSTRAP_NAME)):
        return None
    token = new_admin_token()
    session.add(AdminToken(name=BOOTSTRAP_NAME, token_hash=hash_secret(secret_key, token)))
    session.add(AuditLog(actor=ACTOR, action="admin_token.create", target=BOOTSTRAP_NAME))
    return token


async def bootstrap(
    sessions: async_sessionmaker[AsyncSession],
    *,
    secret_key: str,
    admin_token_configured: bool,
) -> BootstrapResult:
    """Idempotent; safe when several replicas start at once (the loser creates nothing).

    Everything is written in one transaction, not through ``tenancy.tenants`` and
    ``tenancy.api_keys`` (which commit each step): a crash in between must not leave a
    ``default`` tenant whose key was never shown.
    """
    async with sessions() as session:
        try:
            api_key = await _create_default_tenant(session, secret_key)
            admin_token = None
            if not admin_token_configured:
                admin_token = await _create_admin_token(session, secret_key)
            await session.commit()
        except IntegrityError:
            await session.rollback()
            return BootstrapResult(tenant_created=False)
    return BootstrapResult(
        tenant_created=api_key is not None, api_key=api_key, admin_token=admin_token
    )


async def verify_admin_token(
    session: AsyncSession, *, secret_key: str, configured_token: str | None, presented: str
) -> bool:
    """Whether ``presented`` is the configured ``LORAPLEX_ADMIN_TOKEN`` or, when none is
    configured, a stored (unrevoked) bootstrap admin token."""
    if configured_token is not None:
        return hmac.compare_digest(configured_token.encode(), presented.encode())
    if not presented.startswith(ADMIN_TOKEN_PREFIX):
        return False
    found = await session.scalar(
        select(AdminToken.id).where(
            AdminToken.token_hash == hash_secret(secret_key, presented),
            AdminToken.revoked_at.is_(None),
        )
    )
    return found is not None
