"""Redis refused or black-holed: request rates fail open (served, metered), token budgets
fail closed (503 in the envelope with Retry-After), every answer within seconds; once
Redis is back budgets are checked again within seconds, and the ledger is exact."""

from __future__ import annotations

from outage_live import OutageGateway

from tests.gateway.live import BASE


def test_redis_down(og: OutageGateway, mode: str) -> None:
    rated = og.tenant(limits={"requests_per_minute": 2})
    budgeted = og.tenant(limits={"monthly_token_budget": 100_000})
    for t in (rated, budgeted):
        og.chat(t)  # keys cached, limits checked in Redis
    og.proxies.redis.set(mode)
    for _ in range(3):  # over 2 a minute: let through unchecked
        og.chat(rated)
    for _ in range(2):
        og.chat_refused(budgeted.key)

    og.proxies.redis.restore()
    og.wait_recovered(lambda: og.served(budgeted))  # budgets are checked again
    og.chat(budgeted, BASE)
    for t in (rated, budgeted):
        og.assert_ledger_exact(t)
