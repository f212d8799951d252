"""Forty clients cut their streams, against the running gateway: forty usage rows, each billed
by the last figure the replica reported (continuous usage), never a re-count of the text.

Before: a cut stream was billed by re-tokenizing the text relayed (411 completion tokens for
232 generated on the tiny model, whose U+FFFD output re-tokenizes badly)."""

import asyncio
import json
import time

import httpx
import pytest

from metering.models import UsageEvent

pytestmark = pytest.mark.slow

STREAMS = 40


async def cut_after(http, auth, chunks: int) -> int:
    """Read `chunks` content chunks, then hang up; the completion count the client last saw."""
    body = {
        "model": "slow",
        "stream": True,
        "messages": [{"role": "user", "content": "count"}],
        # The client asks for the running counts too, to know what it was last told.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    seen = 0
    last_count = 0
    async with http.stream("POST", "/chat/completions", json=body, headers=auth) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            last_count = chunk["usage"]["completion_tokens"]
            seen += 1
            if seen >= chunks:
                break  # leaving the block closes the connection mid-stream
    return last_count


def test_forty_cut_streams_are_forty_rows_billed_by_the_replicas_last_figure(
    gateway, organization, inference_key, make_deployment, upstream_server
):
    # "stub-slow": 100 tokens, 20 ms apart, with usage on every chunk when asked (as vLLM).
    make_deployment(
        organization, name="slow", endpoints=[upstream_server.url], served_model_name="stub-slow"
    )
    _key, secret = inference_key(organization)
    auth = {"authorization": f"Bearer {secret}"}

    async def run():
        async with httpx.AsyncClient(base_url=gateway.v1, timeout=60) as http:
            return await asyncio.gather(
                *(cut_after(http, auth, 1 + index % 5) for index in range(STREAMS))
            )

    last_seen = asyncio.run(run())
    deadline = time.monotonic() + 20
    while UsageEvent.objects.count() < STREAMS and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more arrives
    rows = list(UsageEvent.objects.all())
    assert len(rows) == STREAMS
    assert {row.status_code for row in rows} == {499}
    assert {row.usage_source for row in rows} == {UsageEvent.Source.UPSTREAM_PARTIAL}
    assert {row.prompt_tokens for row in rows} == {12}
    # Each row is what the replica had reported when the gateway learnt of the hang-up: at
    # least what its client was last told, and far from the 100 a whole answer has.
    billed = sorted(row.completion_tokens for row in rows)
    assert all(count < 100 for count in billed)
    assert billed[0] >= 1 and sum(billed) >= sum(last_seen)
    # The stub's tokens are " t0", " t1", …: a re-count of the text would not equal the figure
    # the replica reported, token for token; each row is a count the replica sent.
    assert set(billed) <= set(range(1, 100))
