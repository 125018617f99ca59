"""Parsing the limits JSON: what admin PATCH bodies and plan rows may hold."""

from __future__ import annotations

import pytest

from loraplex.tenancy.errors import InvalidInput
from loraplex.tenancy.limits import Limits, effective_tenant_limits, validate_limits


def test_parse_and_round_trip():
    raw = {
        "requests_per_minute": 60,
        "monthly_spend_budget_micros": 5_000_000,
        "max_concurrent": None,
    }
    lim = Limits.parse(raw)
    assert lim.requests_per_minute == 60 and lim.max_concurrent is None
    assert lim.to_json() == {"requests_per_minute": 60, "monthly_spend_budget_micros": 5_000_000}
    assert Limits.parse(None).empty and Limits.parse({}).empty
    assert validate_limits({"tokens_per_minute": 1000.0}) == {"tokens_per_minute": 1000}


@pytest.mark.parametrize(
    ("raw", "param", "message"),
    [
        ([], "limits", "must be a JSON object"),
        ({"rpm": 5}, "limits.rpm", "unknown field 'rpm'"),
        ({"requests_per_minute": -1}, "limits.requests_per_minute", "0 or more"),
        ({"tokens_per_minute": "100"}, "limits.tokens_per_minute", "whole number"),
        ({"max_concurrent": True}, "limits.max_concurrent", "whole number"),
        ({"monthly_token_budget": 1.5}, "limits.monthly_token_budget", "whole number"),
        ({"monthly_token_budget": 2**60}, "limits.monthly_token_budget", "at most"),
    ],
)
def test_invalid_limits_name_the_field(raw, param, message):
    with pytest.raises(InvalidInput, match=message) as err:
        Limits.parse(raw)
    assert err.value.param == param and err.value.status == 400


def test_tenant_limits_override_the_plan_field_by_field():
    plan = {"requests_per_minute": 60, "monthly_token_budget": 1_000_000}
    tenant = {"requests_per_minute": 600, "max_concurrent": 4}
    assert effective_tenant_limits(plan, tenant) == {
        "requests_per_minute": 600,
        "max_concurrent": 4,
        "monthly_token_budget": 1_000_000,
    }
    assert effective_tenant_limits(None, None) == {}
