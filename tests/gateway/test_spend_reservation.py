"""Spend is held, not only read: concurrent admissions never hold more than the allowance, in
process and in Redis; settlement releases the hold and adds the real cost; a rate refusal
holds no spend and a spend refusal draws no tokens; a dead gateway's holds are dropped."""

import asyncio
import uuid

import pytest
import redis

from gateway.limits import (
    HEARTBEAT_TTL_MS,
    LocalRateLimiter,
    RedisRateLimiter,
    SpendHold,
    combined,
    limits_for,
)
from tests.gateway.test_limits import LIMITERS, REDIS_URL, needs_redis

pytestmark = pytest.mark.nodb


def make_limiter(kind):
    if kind == "local":
        return LocalRateLimiter()
    return RedisRateLimiter(REDIS_URL, prefix=f"test:spend:{uuid.uuid4().hex}:")


def tokens(cost, *, tpm=0, rpm=0):
    return limits_for(
        key_id=1, key_rpm=rpm, key_tpm=tpm, organization_id=7, org_rpm=0, org_tpm=0, tokens=cost
    )


KEY = "s:7:1764547200"


@pytest.mark.parametrize("kind", LIMITERS)
def test_fifty_concurrent_holds_never_exceed_the_allowance(kind):
    async def run():
        limiter = make_limiter(kind)
        results = await asyncio.gather(
            *(limiter.admit(tokens(10), SpendHold(KEY, 1_000, 70)) for _ in range(50))
        )
        settled = await limiter.spend_settled(KEY)
        await limiter.close()
        return results, settled

    results, settled = asyncio.run(run())
    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 14  # 14 x 70 = 980 <= 1000 < 15 x 70
    refused = [r for r in results if not r.allowed]
    assert all(r.spend_refused and r.cause == "spend" for r in refused)
    assert settled == 0


@pytest.mark.parametrize("kind", LIMITERS)
def test_settlement_releases_the_hold_and_adds_the_real_cost(kind):
    async def run():
        limiter = make_limiter(kind)
        first = await limiter.admit([], SpendHold(KEY, 1_000, 600))
        second = await limiter.admit([], SpendHold(KEY, 1_000, 600))
        await limiter.settle(first, 0, spent=150)
        third = await limiter.admit([], SpendHold(KEY, 1_000, 600))
        fourth = await limiter.admit([], SpendHold(KEY, 1_000, 300))
        await limiter.settle(third, 0, spent=600)
        if kind == "redis":
            await limiter.flush()
        settled = await limiter.spend_settled(KEY)
        await limiter.close()
        return first, second, third, fourth, settled

    first, second, third, fourth, settled = asyncio.run(run())
    assert first.allowed and not second.allowed and second.spend_left == 400
    assert third.allowed and third.spend_left == 850  # 1000 - 150 settled
    assert not fourth.allowed and fourth.spend_left == 250  # 1000 - 150 - 600 held
    assert settled == 750


@pytest.mark.parametrize("kind", LIMITERS)
def test_a_rate_refusal_holds_no_spend_and_a_spend_refusal_draws_no_tokens(kind):
    async def run():
        limiter = make_limiter(kind)
        over_rate = await limiter.admit(tokens(2_000, tpm=1_000), SpendHold(KEY, 1_000, 100))
        over_spend = await limiter.admit(tokens(600, tpm=1_000), SpendHold(KEY, 1_000, 2_000))
        # Neither drew anything: both the tokens and the spend are whole.
        whole = await limiter.admit(tokens(1_000, tpm=1_000), SpendHold(KEY, 1_000, 1_000))
        await limiter.close()
        return over_rate, over_spend, whole

    over_rate, over_spend, whole = asyncio.run(run())
    assert over_rate.cause == "rate" and over_rate.wait_seconds == float("inf")
    assert over_spend.cause == "spend"
    assert whole.allowed


@pytest.mark.parametrize("kind", LIMITERS)
def test_a_request_admitted_in_two_steps_settles_what_both_drew(kind):
    async def run():
        limiter = make_limiter(kind)
        bound = await limiter.admit(tokens(800, tpm=1_000, rpm=5))  # body-size bound
        exact = await limiter.admit(
            limits_for(
                key_id=1, key_rpm=5, key_tpm=1_000, organization_id=7, org_rpm=0, org_tpm=0,
                tokens=300 - 800, requests=0,
            ),
            SpendHold(KEY, 1_000, 90),
        )  # fmt: skip
        admission = combined(bound, exact)
        left_before = int(dict(exact.headers())[b"x-ratelimit-remaining-tokens"])
        await limiter.settle(admission, 100, spent=40)
        if kind == "redis":
            await limiter.flush()
        after = await limiter.admit(tokens(0, tpm=1_000, rpm=5), SpendHold(KEY, 1_000, 1))
        await limiter.close()
        return admission, left_before, after

    admission, left_before, after = asyncio.run(run())
    costs = {limit.kind: limit.cost for limit in admission.limits}
    assert costs == {"requests": 1, "tokens": 300}
    assert admission.spend.cost == 90
    assert 700 <= left_before <= 702
    remaining = dict(after.headers())
    assert 900 <= int(remaining[b"x-ratelimit-remaining-tokens"]) <= 902
    assert remaining[b"x-ratelimit-remaining-requests"] == b"3"
    assert after.spend_left == 960


@needs_redis
def test_the_holds_of_a_gateway_process_that_died_are_dropped():
    async def run():
        prefix = f"test:spend:{uuid.uuid4().hex}:"
        dead, alive = (
            RedisRateLimiter(REDIS_URL, prefix=prefix),
            RedisRateLimiter(REDIS_URL, prefix=prefix),
        )
        held = await dead.admit([], SpendHold(KEY, 1_000, 800))
        refused = await alive.admit([], SpendHold(KEY, 1_000, 800))
        # The dead process's heartbeat runs out (kill -9: nothing is settled or closed).
        dead._heartbeat.cancel()
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(f"{prefix}gw:{dead._instance}")
        admitted = await alive.admit([], SpendHold(KEY, 1_000, 800))
        client.delete(*client.keys(prefix + "*"))
        await alive.close()
        return held, refused, admitted

    held, refused, admitted = asyncio.run(run())
    assert held.allowed and not refused.allowed and admitted.allowed
    assert HEARTBEAT_TTL_MS <= 60_000
