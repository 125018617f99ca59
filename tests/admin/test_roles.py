"""Role policy and claim reading, from primitives (no server)."""

from __future__ import annotations

import pytest

from loraplex.admin.oidc import claim_values, looks_like_jwt
from loraplex.admin.roles import Perm, Role, allowed, parse_role, roles_from_claim


@pytest.mark.parametrize(
    ("value", "role"),
    [
        ("admin", Role("admin")),
        ("viewer", Role("viewer")),
        ("tenant-admin:acme", Role("tenant-admin", "acme")),
        ("tenant-admin:", None),
        ("tenant-admin:Acme!", None),
        ("tenant-admin", None),
        ("root", None),
        ("operator:acme", None),
    ],
)
def test_parse_role(value: str, role: Role | None) -> None:
    assert parse_role(value) == role


def test_role_map_is_the_only_source_when_set() -> None:
    mapping = {"ops": "operator", "acme-admins": "tenant-admin:acme"}
    assert roles_from_claim(["ops", "admin", "acme-admins", "ops"], mapping) == (
        Role("operator"),
        Role("tenant-admin", "acme"),
    )
    assert roles_from_claim(["admin", "nobody"], {}) == (Role("admin"),)


def test_claim_values_follow_dotted_paths() -> None:
    claims = {"realm_access": {"roles": ["a", 3, "b"]}, "scope": "x y", "n": {"k": 1}}
    assert claim_values(claims, "realm_access.roles") == ["a", "b"]
    assert claim_values(claims, "scope") == ["x", "y"]
    assert claim_values(claims, "n.k") == [] and claim_values(claims, "missing.path") == []


def test_permissions() -> None:
    acme = (Role("tenant-admin", "acme"),)
    assert allowed(acme, Perm.MANAGE_KEYS, "acme")
    assert not allowed(acme, Perm.MANAGE_KEYS, "globex")
    assert not allowed(acme, Perm.READ, None)  # all tenants
    assert not allowed(acme, Perm.MANAGE_TENANTS, "acme")
    assert allowed((Role("viewer"),), Perm.AUDIT, None)
    assert not allowed((Role("viewer"),), Perm.MANAGE_PLANS, None)
    assert not allowed((Role("operator"),), Perm.SYSTEM, None)
    assert allowed((Role("viewer"), Role("operator")), Perm.MANAGE_PLANS, None)
    assert not allowed((), Perm.READ, None)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    assert not looks_like_jwt("lpxadm_abc.def.ghi")
    assert not looks_like_jwt("lpx_abcd_efgh")
