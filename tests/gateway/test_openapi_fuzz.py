"""Schemathesis over the whole OpenAPI document against the live gateway (uvicorn, the tiny
Llama engine, PostgreSQL, Redis): every operation, with data that fits the document and
data that does not. Any 5xx, any status the document does not list for the operation, a
content type it does not list, or a body its schema does not allow fails the test.

Bounded for CI: a few examples per operation and mode, a fixed seed (``derandomize``),
no shrinking beyond hypothesis' default phases; about a minute on two cores.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import BASE, Gateway, ok

INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
SHORT = 4  # tokens per completion the fuzzer asks for
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 40  # per operation; each mode (positive, negative) gets its share


@pytest.fixture(scope="module")
def fuzz_key(gateway: Gateway) -> str:
    """A key of tenant a with every scope, so that /v1 operations get past authorization."""
    scopes = ["inference", "adapters:read", "adapters:write", "usage:read"]
    with gateway.admin() as admin:
        issued = ok(
            admin.post(f"/admin/v1/tenants/{gateway.tenants['a']}/keys", json={"scopes": scopes})
        )
    return str(issued["key"])


def _document() -> dict[str, Any]:
    """The document the live gateway serves: the app factory's routes do not depend on
    settings, and the lazy (fixture) loader of schemathesis 4.32 fails on pytest 9.2."""
    with tempfile.TemporaryDirectory() as data_dir:  # (the app makes its local object store)
        settings = GatewaySettings(
            database_url="postgresql+asyncpg://unused/unused",
            admin_token=secrets.token_hex(16),
            secret_key=secrets.token_hex(32),
            data_dir=Path(data_dir),
        )
        return create_app(settings).openapi()


def _aim(case: Any) -> None:
    """Half the inference cases name the served model, so that the engine runs them (the
    others name models that do not exist: 404); completions are kept short."""
    body = case.body
    if case.path not in INFERENCE or not isinstance(body, dict):
        return
    if not isinstance(body.get("model"), str) or len(body["model"]) % 2:
        return
    body["model"] = BASE
    if case.path == "/v1/embeddings":
        return  # (no completion to keep short)
    first = "max_output_tokens" if case.path == "/v1/responses" else "max_tokens"
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if field in body or field == first:
            value = body.get(field, SHORT)
            body[field] = min(value, SHORT) if isinstance(value, int) else value


schema = schemathesis.openapi.from_dict(_document())
schema.config.generation.update(max_examples=EXAMPLES)


def test_document_is_the_one_served(gateway: Gateway) -> None:
    with gateway.http() as http:
        assert http.get("/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_openapi_document_is_true(case: Any, gateway: Gateway, fuzz_key: str) -> None:
    _aim(case)
    token = gateway.admin_token if case.path.startswith("/admin/") else fuzz_key
    response = case.call(
        base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    case.validate_response(response, checks=CHECKS)
