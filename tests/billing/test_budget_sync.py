"""Budget counters lost by the limiter's store (a Redis restart without persistence) come
back from the ledger: a tenant never gets a fresh monthly budget by accident."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from billing_helpers import event, make_tenant
from prometheus_client import CollectorRegistry

from loraplex.gateway.budget_sync import sync_budgets
from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limiter_redis import RedisLimiter
from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.errors import QuotaExceeded
from loraplex.tenancy.principal import Principal
from loraplex.tenancy.usage_service import insert_usage


def principal(tenant_limits, key_limits=None, *, tenant_id, key_id) -> Principal:
    return Principal(
        tenant_id=tenant_id,
        tenant_name="acme",
        key_id=key_id,
        scopes=frozenset({"inference"}),
        tenant_limits=tenant_limits,
        key_limits=key_limits or {},
    )


@pytest.fixture(params=["redis", "memory"])
async def limiter(request, redis_url):
    metrics = Metrics(CollectorRegistry())
    lim = (
        RedisLimiter.from_url(redis_url, metrics)
        if request.param == "redis"
        else InProcessLimiter(metrics)
    )
    yield lim
    await lim.aclose()


async def test_budget_counters_are_restored_from_the_ledger(sessions, limiter):
    import uuid

    tid = await make_tenant(sessions, "acme")
    key_a, key_b = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    start = max(
        now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now - timedelta(hours=1)
    )
    events = [
        dataclasses.replace(
            event(tid, i, start=start, step=timedelta(seconds=1)),
            api_key_id=(key_a, key_b)[i % 2],
        )
        for i in range(40)
    ]
    async with sessions() as s:
        await insert_usage(s, events)
        await s.commit()
    used = sum(e.prompt_tokens + e.completion_tokens for e in events)
    used_a = sum(e.prompt_tokens + e.completion_tokens for e in events if e.api_key_id == key_a)

    tenant_budget = principal({"monthly_token_budget": used + 100}, tenant_id=tid, key_id=key_b)
    key_budget = principal({}, {"monthly_token_budget": used_a + 10}, tenant_id=tid, key_id=key_a)
    # The store has forgotten the month (fresh limiter / flushed Redis): too generous.
    await limiter.settle(await limiter.admit(tenant_budget, 150), 0)

    assert await sync_budgets(sessions, limiter) == 3  # the tenant and its two keys
    with pytest.raises(QuotaExceeded):
        await limiter.admit(tenant_budget, 150)
    await limiter.settle(await limiter.admit(tenant_budget, 100), 100)
    with pytest.raises(QuotaExceeded):
        await limiter.admit(tenant_budget, 1)  # the tenant's budget is now used up

    with pytest.raises(QuotaExceeded, match="key limit"):
        await limiter.admit(key_budget, 11)

    # Syncing again never lowers what the limiter counted since.
    await sync_budgets(sessions, limiter)
    with pytest.raises(QuotaExceeded):
        await limiter.admit(tenant_budget, 1)
