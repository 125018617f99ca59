"""Admin roles and what each may do. Pure policy: no I/O, no FastAPI.

``admin`` may do everything; ``operator`` manages tenants, keys, adapters and plans and reads
everything; ``viewer`` reads (usage and the audit log included); ``tenant-admin:<tenant>``
reads its tenant and manages that tenant's keys and adapters, nothing else.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # as tenancy.tenants names them


class Perm(enum.Enum):
    READ = "read"  # tenants, keys, plans, adapters
    USAGE = "usage"  # usage exports
    AUDIT = "audit"  # the audit log and its export
    MANAGE_TENANTS = "manage_tenants"  # create and update tenants (status, limits, plan)
    MANAGE_PLANS = "manage_plans"
    MANAGE_KEYS = "manage_keys"
    MANAGE_ADAPTERS = "manage_adapters"
    SYSTEM = "system"  # maintenance: adapter garbage collection


_GLOBAL: dict[str, frozenset[Perm]] = {
    "admin": frozenset(Perm),
    "operator": frozenset(Perm) - {Perm.SYSTEM},
    "viewer": frozenset({Perm.READ, Perm.USAGE, Perm.AUDIT}),
}
_TENANT_ADMIN = frozenset({Perm.READ, Perm.USAGE, Perm.MANAGE_KEYS, Perm.MANAGE_ADAPTERS})


@dataclass(frozen=True)
class Role:
    name: str  # admin | operator | viewer | tenant-admin
    tenant: str | None = None  # tenant-admin's tenant

    def __str__(self) -> str:
        return f"{self.name}:{self.tenant}" if self.tenant else self.name

    def allows(self, perm: Perm, tenant: str | None) -> bool:
        """``tenant``: the tenant the request concerns (None: none, or all tenants)."""
        if self.tenant is not None:
            return perm in _TENANT_ADMIN and tenant == self.tenant
        return perm in _GLOBAL[self.name]


ADMIN = Role("admin")


def parse_role(value: str) -> Role | None:
    if value in _GLOBAL:
        return Role(value)
    name, sep, tenant = value.partition(":")
    if name == "tenant-admin" and sep and _TENANT.match(tenant):
        return Role(name, tenant)
    return None


def roles_from_claim(values: list[str], role_map: dict[str, str]) -> tuple[Role, ...]:
    """The roles a token's claim values grant: through ``role_map`` when one is configured,
    else the values that are role names themselves. Unknown values grant nothing."""
    found: list[Role] = []
    for value in values:
        mapped = role_map.get(value) if role_map else value
        role = parse_role(mapped) if mapped is not None else None
        if role is not None and role not in found:
            found.append(role)
    return tuple(found)


def allowed(roles: tuple[Role, ...], perm: Perm, tenant: str | None) -> bool:
    return any(role.allows(perm, tenant) for role in roles)
