"""Requests and tokens per minute, per key and per organization: never more admitted than the
limit, even under 50 concurrent requests, in process and in Redis; OpenAI's headers and 429s."""

import asyncio
import os
import uuid

import httpx
import pytest
import redis

from gateway.limits import LocalRateLimiter, RedisRateLimiter, format_duration, limits_for
from metering.models import UsageEvent

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
CHAT = [{"role": "user", "content": "hi"}]


def redis_available() -> bool:
    try:
        return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_available(), reason="no Redis at " + REDIS_URL)


LIMITERS = [
    pytest.param("local", id="in-process"),
    pytest.param("redis", id="redis", marks=needs_redis),
]


def make_limiter(kind):
    if kind == "local":
        return LocalRateLimiter()
    return RedisRateLimiter(REDIS_URL, prefix=f"test:limits:{uuid.uuid4().hex}:")


def request_limits(tokens, *, key_rpm=None, key_tpm=None, org_rpm=0, org_tpm=0, key_id=1):
    return limits_for(
        key_id=key_id,
        key_rpm=key_rpm,
        key_tpm=key_tpm,
        organization_id=7,
        org_rpm=org_rpm,
        org_tpm=org_tpm,
        tokens=tokens,
    )


@pytest.mark.nodb
@pytest.mark.parametrize("kind", LIMITERS)
def test_fifty_concurrent_admissions_never_exceed_any_limit(kind):
    async def run():
        limiter = make_limiter(kind)
        # Two keys share an organization allowing 12 requests; each key allows 10 requests and
        # 1000 tokens; each request reserves 150 tokens: a key fits 6 (900 tokens).
        results = await asyncio.gather(
            *(
                limiter.admit(
                    request_limits(150, key_rpm=10, key_tpm=1000, org_rpm=12, key_id=i % 2)
                )
                for i in range(50)
            )
        )
        if kind == "redis":
            await limiter.close()
        return results

    results = asyncio.run(run())
    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 12
    by_key = [sum(1 for i, r in enumerate(results) if r.allowed and i % 2 == k) for k in (0, 1)]
    assert by_key == [6, 6]
    refused = [r for r in results if not r.allowed]
    assert {r.refused.kind for r in refused} <= {"requests", "tokens"}
    assert all(r.wait_seconds > 0 for r in refused)


@pytest.mark.nodb
@pytest.mark.parametrize("kind", LIMITERS)
def test_settlement_gives_back_what_was_not_used(kind):
    async def run():
        limiter = make_limiter(kind)
        first = await limiter.admit(request_limits(600, key_tpm=1000))
        assert first.allowed
        assert not (await limiter.admit(request_limits(600, key_tpm=1000))).allowed
        await limiter.settle(first, 100)  # used 100 of 600: 500 come back
        second = await limiter.admit(request_limits(600, key_tpm=1000))
        too_big = await limiter.admit(request_limits(1001, key_tpm=1000))
        if kind == "redis":
            await limiter.close()
        return first, second, too_big

    first, second, too_big = asyncio.run(run())
    assert second.allowed
    remaining = dict(second.headers())[b"x-ratelimit-remaining-tokens"]
    assert 300 <= int(remaining) <= 302  # 1000 - 100 - 600, plus a moment's refill
    assert not too_big.allowed and too_big.wait_seconds == float("inf")
    assert dict(first.headers())[b"x-ratelimit-limit-tokens"] == b"1000"


@pytest.mark.nodb
def test_reset_durations_read_like_openais():
    assert format_duration(0.02) == "20ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"


@pytest.fixture
def stub_deployment(organization, make_deployment, upstream_server):
    return make_deployment(organization, name="chat", endpoints=[upstream_server.url])


def fire(url, secret, count):
    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        url + "/chat/completions",
                        json={"model": "chat", "messages": CHAT, "max_tokens": 5},
                        headers={"authorization": f"Bearer {secret}"},
                    )
                    for _ in range(count)
                )
            )

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.parametrize("kind", LIMITERS)
def test_fifty_concurrent_requests_through_the_gateway(
    kind, gateway, organization, inference_key, stub_deployment
):
    if kind == "redis":
        gateway.reset(redis_url=REDIS_URL)
    else:
        gateway.reset(redis_url="")
    _key, secret = inference_key(organization, rpm_limit=10)
    responses = fire(gateway.v1, secret, 50)
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(limited)) == (10, 40)
    error = limited[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "requests per minute" in error["message"]
    assert int(limited[0].headers["retry-after"]) >= 1
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "10"
        assert "x-ratelimit-remaining-requests" in response.headers
        assert "x-ratelimit-reset-requests" in response.headers
    assert UsageEvent.objects.count() == 10


@pytest.mark.slow
def test_organization_limit_spans_its_keys(gateway, organization, inference_key, stub_deployment):
    gateway.reset(org_rpm_limit=4)
    _a, first = inference_key(organization)
    _b, second = inference_key(organization)
    statuses = [r.status_code for r in fire(gateway.v1, first, 3) + fire(gateway.v1, second, 3)]
    assert sorted(statuses) == [200] * 4 + [429] * 2


@pytest.mark.slow
def test_tokens_are_reserved_then_settled_with_real_usage(
    gateway, organization, inference_key, stub_deployment
):
    _key, secret = inference_key(organization, tpm_limit=100)
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": "chat", "messages": CHAT, "max_tokens": 40}
    with httpx.Client(base_url=gateway.v1, headers=headers) as client:
        first = client.post("/chat/completions", json=body)
        # Reserved: about 5 prompt tokens (estimated: no tokenizer) + 40.
        assert 53 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 57
        second = client.post("/chat/completions", json=body)
        # The first was settled with its real usage (12 + 8 from the replica).
        assert 33 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 38
        third = client.post("/chat/completions", json={**body, "max_tokens": 95})
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "tokens"
    huge = httpx.post(
        gateway.v1 + "/chat/completions", json={**body, "max_tokens": 500}, headers=headers
    )
    assert huge.status_code == 429 and "Request too large" in huge.json()["error"]["message"]


@pytest.mark.slow
def test_n_choices_reserve_n_times_max_tokens(
    gateway, organization, inference_key, stub_deployment
):
    gateway.reset(redis_url="")
    _key, secret = inference_key(organization, tpm_limit=100)
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": "chat", "messages": CHAT, "max_tokens": 40}
    with httpx.Client(base_url=gateway.v1, timeout=30) as client:
        one = client.post("/chat/completions", json=body, headers=headers)
        three = client.post("/chat/completions", json={**body, "n": 3}, headers=headers)
        bad = client.post("/chat/completions", json={**body, "n": 0}, headers=headers)
    assert one.status_code == 200
    # 3 x 40 completion tokens cannot fit 100 tokens a minute, whatever the prompt.
    assert three.status_code == 429
    assert three.json()["error"]["message"].startswith("Request too large")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
