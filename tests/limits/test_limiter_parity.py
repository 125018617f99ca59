"""The Lua script, the in-process limiter and the limits broker (through two worker
clients) decide alike: one random sequence of admits and settles (well inside a minute,
so no window expires), run on all three, step by step."""

from __future__ import annotations

import random
import uuid

import pytest
from limits_helpers import new_metrics, principal

from loraplex.gateway.limiter_broker import BrokerLimiter
from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limiter_redis import RedisLimiter
from loraplex.gateway.limits import Admission
from loraplex.tenancy.errors import RateLimited

STABLE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


def outcome(result: Admission | RateLimited) -> tuple:
    headers = result.headers
    stable = tuple(headers.get(h) for h in STABLE_HEADERS)
    if isinstance(result, Admission):
        return ("admitted", stable)
    # Which violation the message names depends on retry times, i.e. on each clock.
    return (type(result).__name__, result.code, stable)


# Two profiles, so that every kind of refusal happens: rates bind first, or budgets do.
PROFILES = {
    "rates": ((20, 60), (500, 1500), (800, 2000), (2000, 6000), 15, 400),
    "budgets": ((100, 200), (2000, 4000), (1500, 3000), (3000, 9000), 40, 1200),
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_redis_in_process_and_broker_decide_alike(redis_url, limits_broker, seed, profile):
    rng = random.Random(seed)
    rpm, tpm, budget, spend, key_rpm, key_tpm = PROFILES[profile]
    tid, keys = uuid.uuid4(), [uuid.uuid4(), uuid.uuid4()]
    tenant_limits = {
        "requests_per_minute": rng.randint(*rpm),
        "tokens_per_minute": rng.randint(*tpm),
        "max_concurrent": rng.randint(3, 8),
        "monthly_token_budget": rng.randint(*budget),
        "monthly_spend_budget_micros": rng.randint(*spend),
    }
    who = [
        principal(tenant_limits, {"requests_per_minute": key_rpm, "max_concurrent": 3},
                  tenant_id=tid, key_id=keys[0], prompt_price=1_000_000, completion_price=3_000_000),
        principal(tenant_limits, {"tokens_per_minute": key_tpm},
                  tenant_id=tid, key_id=keys[1], prompt_price=1_000_000, completion_price=3_000_000),
    ]  # fmt: skip
    redis = RedisLimiter.from_url(redis_url, new_metrics())
    memory = InProcessLimiter(new_metrics())
    workers = [BrokerLimiter(limits_broker.address, new_metrics()) for _ in range(2)]
    open_: list[tuple[Admission, Admission, Admission]] = []
    try:
        for step in range(250):
            if open_ and rng.random() < 0.4:
                a_redis, a_memory, a_broker = open_.pop(rng.randrange(len(open_)))
                used = rng.randint(0, a_redis.reserved_tokens)
                cost = rng.randint(0, a_redis.reserved_spend_micros)
                await redis.settle(a_redis, used, cost_micros=cost)
                await memory.settle(a_memory, used, cost_micros=cost)
                await workers[step % 2].settle(a_broker, used, cost_micros=cost)
                continue
            p = who[rng.randrange(2)]
            reserve = rng.randint(1, 120)
            prompt = rng.choice([None, rng.randint(0, reserve)])
            results = []
            for lim in (redis, memory, workers[step % 2]):
                try:
                    results.append(await lim.admit(p, reserve, prompt_tokens=prompt))
                except RateLimited as exc:
                    results.append(exc)
            assert outcome(results[0]) == outcome(results[1]) == outcome(results[2]), f"step {step}"
            assert not any(isinstance(r, Admission) and r.degraded for r in results)
            if isinstance(results[0], Admission):
                open_.append(tuple(results))  # type: ignore[arg-type]
    finally:
        await redis.aclose()
        for w in workers:
            await w.aclose()
