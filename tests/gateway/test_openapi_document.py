"""What the OpenAPI document says, statically (the fuzzer checks it against the server)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings

ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = GatewaySettings(
        database_url="postgresql+asyncpg://unused/unused",
        admin_token=secrets.token_hex(16),
        secret_key=secrets.token_hex(32),
        data_dir=tmp_path_factory.mktemp("openapi"),  # (the app makes its local object store)
    )
    document: dict[str, Any] = create_app(settings).openapi()
    return document


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_every_error_status_is_the_envelope_and_none_is_422(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        assert {"400", "413", "500"} <= set(responses), (method, path)
        for status, response in responses.items():
            if int(status) >= 400 and path != "/ready":
                assert response["content"]["application/json"]["schema"] == ENVELOPE
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_authenticated_operations_document_401(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        if path.startswith(("/v1/", "/admin/")):
            assert "401" in op["responses"], (method, path)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"403", "404", "415", "429", "503"} <= set(chat)


def test_response_media_types(doc: dict[str, Any]) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    for path in ("/v1/usage", "/admin/v1/usage/export"):
        content = doc["paths"][path]["get"]["responses"]["200"]["content"]
        assert set(content) == {
            "text/csv; charset=utf-8",
            "application/x-ndjson",
            "application/vnd.apache.parquet",
        }


def test_upload_body_and_names_are_documented(doc: dict[str, Any]) -> None:
    upload = doc["paths"]["/admin/v1/tenants/{tenant}/adapters"]["post"]["requestBody"]
    schema = upload["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["name", "files"]
    assert schema["properties"]["files"]["items"]["format"] == "binary"
    tenant = doc["components"]["schemas"]["TenantCreate"]["properties"]["name"]
    assert tenant["pattern"] == "^[a-z0-9][a-z0-9_-]{0,63}$"
    seed = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["seed"]
    # FastAPI's OpenAPI model holds bounds as floats (JSON numbers are doubles to most readers)
    assert (seed["anyOf"][0]["minimum"], seed["anyOf"][0]["maximum"]) == (-(2.0**63), 2.0**63 - 1)


def test_plan_times_are_date_times(doc: dict[str, Any]) -> None:
    created = doc["components"]["schemas"]["PlanOut"]["properties"]["created_at"]
    assert created == {"type": "string", "format": "date-time", "title": "Created At"}
