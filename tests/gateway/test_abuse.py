"""Abuse suite for the inference routes, at the production body limit (4 MiB): every kind
of bad input in ``abuse_cases`` gets its 4xx in the envelope, the server serves a normal
request right after it, and the oversized inputs leave the process' memory bounded."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.gateway.settings import GatewaySettings
from tests.gateway.abuse_cases import CASES, CHAT, TEXT, Case, chat, text
from tests.gateway.envelope import error
from tests.gateway.live import Gateway

MEMORY_BOUND_MB = 200


@pytest.fixture(scope="module")
def max_body_bytes() -> int:
    limit = GatewaySettings.model_fields["max_body_bytes"].default
    assert limit == 4 << 20
    return int(limit)


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.http("a") as client:
        yield client


def _serves(http: httpx.Client) -> None:
    r = http.post(CHAT, json=chat(max_tokens=1))
    assert r.status_code == 200, r.text


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = {"content-type": case.content_type} if case.content_type else {}
    return http.post(case.route, content=case.body, headers=headers)


def test_the_table_holds_sixty_kinds() -> None:
    assert len({c.kind for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_fails_only_its_request(http: httpx.Client, case: Case) -> None:
    err = error(_send(http, case), case.status)
    if case.param is not None:
        assert err["param"] == case.param, err
    _serves(http)


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/xml", 415),
        ("application/json; charset=utf-8", 200),
        ("application/merge-patch+json", 200),
        (None, 415),
    ],
)
def test_content_types(http: httpx.Client, content_type: str | None, status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(CHAT, content=json.dumps(chat(max_tokens=1)), headers=headers)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert "application/json" in error(r, status)["message"]


def test_method_and_credentials(gateway: Gateway, http: httpx.Client) -> None:
    error(http.get(CHAT), 405)
    with gateway.http() as anonymous:
        error(anonymous.post(CHAT, json=chat()), 401)
    with gateway.http("a_revoked") as revoked:
        error(revoked.post(CHAT, json=chat()), 401)
    _serves(http)


@pytest.mark.parametrize(
    "content",
    ["nul \u0000 byte", "emoji 😀👩‍👩‍👧", "rtl \u202eoverride", "zero\u200bwidth", "e\u0301"],
)
def test_odd_but_valid_unicode_is_served(http: httpx.Client, content: str) -> None:
    r = http.post(CHAT, json=chat(messages=[{"role": "user", "content": content}], max_tokens=1))
    assert r.status_code == 200, r.text


# ---- memory ------------------------------------------------------------------------------

_BIG = (4 << 20) - 64 * 1024  # under the body limit, with room for the JSON around it


def _oversized() -> list[tuple[str, str, bytes, str]]:
    """(kind, route, body, param): each just under the 4 MiB body limit."""
    ids = ",".join(["7"] * (_BIG // 2))
    many = json.dumps(chat(messages=[{"role": "user", "content": ""}] * 100_000))
    return [
        ("1 MiB stop string", CHAT, json.dumps(chat(stop="x" * (1 << 20))).encode(), "stop"),
        (
            "3.9 MB text prompt",
            TEXT,
            json.dumps(text(prompt="The fox. " * (_BIG // 9))).encode(),
            "prompt",
        ),
        (
            "3.9 MB chat message",
            CHAT,
            json.dumps(chat(messages=[{"role": "user", "content": "a b " * (_BIG // 4)}])).encode(),
            "messages",
        ),
        (
            "2M token ids",
            TEXT,
            ('{"model": "tiny-llama", "prompt": [' + ids + "]}").encode(),
            "prompt",
        ),
        ("100,000 messages", CHAT, many.encode(), "messages"),
    ]


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kind", "route", "body", "param"), _oversized(), ids=[o[0] for o in _oversized()]
)
def test_oversized_input_leaves_memory_bounded(
    http: httpx.Client, kind: str, route: str, body: bytes, param: str
) -> None:
    """The server runs in this process (uvicorn in a thread): the peak RSS over the request
    (``VmHWM``, reset first) is what the request cost, JSON parsing included."""
    assert len(body) < 4 << 20
    _serves(http)  # warm
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    r = http.post(route, content=body, headers={"content-type": "application/json"})
    peak_mb = (_kib("VmHWM") - before) / 1024
    err = error(r, 400, param=param)
    assert peak_mb < MEMORY_BOUND_MB, f"{kind}: peak +{peak_mb:.0f} MB ({err['message'][:80]})"
    _serves(http)
