"""Tenant isolation and key states: what each key may list, call, or learn."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.live import BASE, Gateway

MSG = [{"role": "user", "content": "Hello!"}]
A_MODELS = ["support", "support@1", "support@2", "prod"]


def _not_found(gateway: Gateway, key: str, model: str) -> dict:
    with gateway.http(key) as http:
        r = http.post(
            "/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 1}
        )
    assert r.status_code == 404, r.text
    return r.json()["error"]


def test_tenant_b_cannot_list_or_learn_of_a_adapters(gateway: Gateway) -> None:
    ids = {m.id for m in gateway.sdk("b").models.list().data}
    assert ids == {BASE, "globex-secret"}
    ids = {m.id for m in gateway.sdk("a").models.list().data}
    assert "globex-secret" not in ids


@pytest.mark.parametrize("model", A_MODELS)
def test_tenant_b_gets_the_same_404_for_a_adapters_as_for_nothing(
    gateway: Gateway, model: str
) -> None:
    theirs = _not_found(gateway, "b", model)
    nothing = _not_found(gateway, "b", f"{model}-does-not-exist")
    assert theirs["code"] == nothing["code"] == "model_not_found"
    assert theirs["type"] == nothing["type"] and theirs["param"] == nothing["param"] == "model"
    assert theirs["message"] == nothing["message"].replace(f"{model}-does-not-exist", model)
    with pytest.raises(openai.NotFoundError):
        gateway.sdk("b").models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        gateway.sdk("b").completions.create(model=model, prompt="hi", max_tokens=1)


def test_tenant_a_cannot_use_b_adapter(gateway: Gateway) -> None:
    err = _not_found(gateway, "a", "globex-secret")
    assert err["code"] == "model_not_found"


def test_tenant_b_cannot_reach_a_adapters_through_the_admin_routes(gateway: Gateway) -> None:
    with gateway.http("b") as http:
        r = http.get(f"/admin/v1/tenants/{gateway.tenants['a']}/adapters")
    assert r.status_code in (401, 403, 404), r.text
    assert "support" not in r.text


@pytest.mark.parametrize("role", ["a_revoked", "a_expired"])
def test_revoked_and_expired_keys_fail(gateway: Gateway, role: str) -> None:
    client = gateway.sdk(role)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.models.list()
    assert exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=BASE, messages=MSG, max_tokens=1)


def test_suspended_tenant_is_refused(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as exc:
        gateway.sdk("s").chat.completions.create(model=BASE, messages=MSG, max_tokens=1)
    assert exc.value.code == "tenant_suspended"


def test_key_without_inference_scope(gateway: Gateway) -> None:
    client = gateway.sdk("a_read_only")
    assert {m.id for m in client.models.list().data} >= {"support", "prod"}
    for call in (
        lambda: client.chat.completions.create(model=BASE, messages=MSG, max_tokens=1),
        lambda: client.completions.create(model="support", prompt="hi", max_tokens=1),
    ):
        with pytest.raises(openai.PermissionDeniedError) as exc:
            call()
        assert exc.value.status_code == 403 and exc.value.code == "insufficient_scope"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer sk-not-ours",
        "Bearer lpx_zzzzzzzzzzzz_secret",
        "Bearer lpx_0123456789ab_" + "x" * 43,
    ],
)
def test_bad_credentials_are_401(gateway: Gateway, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with gateway.http() as http:
        r = http.get("/v1/models", headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["x-request-id"]


def test_right_prefix_wrong_secret_is_401(gateway: Gateway) -> None:
    good = gateway.keys["a"]
    forged = good[: good.rindex("_") + 1] + ("A" if good[-1] != "A" else "B") * 43
    with gateway.http() as http:
        r = http.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


def test_admin_token_is_not_an_api_key(gateway: Gateway) -> None:
    with gateway.http() as http:
        r = http.get("/v1/models", headers={"Authorization": f"Bearer {gateway.admin_token}"})
    assert r.status_code == 401


def test_revocation_reaches_a_cached_key_within_the_ttl(gateway: Gateway) -> None:
    """The server caches keys for ``key_cache_ttl_s`` (1 s here). A revocation written
    straight to the database (as another replica's admin call would) takes effect once
    the entry expires."""
    tenant = gateway.tenants["a"]
    with gateway.admin() as admin:
        issued = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={}).json()
    client = openai.OpenAI(api_key=issued["key"], base_url=f"{gateway.url}/v1", max_retries=0)
    assert client.models.list().data  # cached now
    gateway.sql("UPDATE api_keys SET revoked_at = now() WHERE prefix = %s", issued["prefix"])
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return
        time.sleep(0.1)
    pytest.fail("revoked key still accepted 5 s after revocation (TTL is 1 s)")


# ---- /authz: the external authorizer of a Kubernetes inference router ------------------------


def _tenant_id(gateway: Gateway, role: str) -> str:
    rows = gateway.sql("SELECT id FROM tenants WHERE name = %s", gateway.tenants[role])
    return str(rows[0][0])


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/authz/v1/chat/completions"), ("GET", "/authz/v1/models"), ("POST", "/authz")],
)
def test_authz_names_the_callers_tenant_for_the_router(
    gateway: Gateway, method: str, path: str
) -> None:
    """Any method and path under /authz (Envoy asks at the prefix + the request's path, with
    the request's method and no body): the tenant's id as the fairness header, the same id
    the engine's scheduler keys that tenant by; a header the client sent has no say."""
    seen = {}
    for role in ("a", "b"):
        with gateway.http(role) as http:
            spoof = {"x-llm-d-inference-fairness-id": "someone-else"}
            r = http.request(method, path, headers=spoof)
        assert r.status_code == 200, r.text
        seen[role] = r.headers["x-llm-d-inference-fairness-id"]
        assert seen[role] == _tenant_id(gateway, role)
    assert seen["a"] != seen["b"]


@pytest.mark.parametrize(
    ("role", "status", "code"),
    [
        (None, 401, "invalid_api_key"),
        ("a_revoked", 401, "invalid_api_key"),
        ("a_expired", 401, "invalid_api_key"),
        ("s", 403, "tenant_suspended"),
        ("a_read_only", 403, None),
    ],
)
def test_authz_refuses_as_the_api_would(
    gateway: Gateway, role: str | None, status: int, code: str | None
) -> None:
    """Refusals in the API's error envelope (Envoy passes them on to the client as they
    are), and never the fairness header."""
    with gateway.http(role) as http:
        r = http.post("/authz/v1/completions")
    assert r.status_code == status, r.text
    assert "x-llm-d-inference-fairness-id" not in r.headers
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code), error
