"""Spend limits under 16 concurrent clients, against the running gateway: every request holds
its worst case before it runs, so the organization's spend never passes its limit (the bound
docs/architecture.md states: no overshoot from token usage when prices do not rise)."""

import asyncio
from decimal import Decimal

import httpx
import pytest

from billing.rating import rate_tokens
from metering.models import UsageEvent
from tests.catalog.factories import TokenPriceFactory
from tests.gateway.test_limits import REDIS_URL, redis_available

pytestmark = pytest.mark.slow

PRICE = Decimal("1000")  # per million tokens, in and out: $0.001 a token
LIMIT = Decimal("0.5")  # the stub answers 12 + 8 tokens: $0.02 a request
CLIENTS = 16


def flood(url, secret, attempts):
    async def client(http):
        served = refused = 0
        for _ in range(attempts):
            response = await http.post(
                url + "/chat/completions",
                json={
                    "model": "chat",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                },
                headers={"authorization": f"Bearer {secret}"},
            )
            if response.status_code == 200:
                served += 1
            else:
                assert response.status_code == 429, response.text
                assert response.json()["error"]["code"] == "insufficient_quota"
                refused += 1
        return served, refused

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(client(http) for _ in range(CLIENTS)))

    return asyncio.run(run())


@pytest.mark.parametrize("limiter", ["in-process", "redis"])
def test_sixteen_clients_never_spend_past_the_limit(
    limiter, gateway, organization, inference_key, make_deployment, upstream_server
):
    if limiter == "redis":
        if not redis_available():
            pytest.skip("no Redis at " + REDIS_URL)
        gateway.reset(redis_url=REDIS_URL, spend_cache_seconds=0.2)
    else:
        gateway.reset(redis_url="", spend_cache_seconds=0.2)
    deployment = make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    TokenPriceFactory(
        model_version=deployment.model_version,
        currency=organization.currency,
        input_per_million=PRICE,
        output_per_million=PRICE,
    )
    organization.monthly_spend_limit = LIMIT
    organization.save(update_fields=["monthly_spend_limit"])
    _key, secret = inference_key(organization)

    results = flood(gateway.v1, secret, attempts=8)

    served = sum(s for s, _ in results)
    events = list(UsageEvent.objects.filter(organization=organization))
    spend = sum(
        (
            rate_tokens(
                input_tokens=e.prompt_tokens,
                output_tokens=e.completion_tokens,
                input_per_million=PRICE,
                output_per_million=PRICE,
            )
            for e in events
        ),
        Decimal(0),
    )
    print(f"\n{limiter}: {served} served, {sum(r for _, r in results)} refused, spent {spend}")
    assert len(events) == served
    assert spend <= LIMIT, f"{served} requests spent {spend}, over the {LIMIT} limit"
    # The holds are released as requests finish: the limit is used, not just refused.
    assert spend >= LIMIT / 2, f"only {spend} of {LIMIT} spent ({served} requests)"
    assert sum(r for _, r in results) > 0
