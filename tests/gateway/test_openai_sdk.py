"""The official openai SDK, sync and async, streaming and not, through the gateway to a real
runtime process serving the tiny MoE; each request leaves exactly one usage event."""

import asyncio

import openai
import pytest

from gateway.tokens import ModelTokenizer
from metering.models import UsageEvent
from tests.gateway.conftest import RUNTIME_SERVED_NAME

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture
def tenant(gateway, organization, inference_key, make_deployment, runtime_process, tiny_moe_dir):
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[runtime_process],
        served_model_name=RUNTIME_SERVED_NAME,
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_moe_dir)
    version.runtime_args = {"max_model_len": 2048}
    version.save(update_fields=["artifact_uri", "runtime_args"])
    key, secret = inference_key(organization)
    return deployment, key, secret


def events():
    return list(UsageEvent.objects.order_by("started_at"))


def test_sync_client_non_streaming_and_streaming(gateway, tenant, tiny_moe_dir):
    deployment, key, secret = tenant
    client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)

    reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 12
    # The gateway's own count (admission, broken streams) agrees with the runtime's.
    assert ModelTokenizer(tiny_moe_dir).count_chat(MESSAGES) == reply.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, stream=True)
    )
    # The usage chunk the gateway asked for is not passed on: the client did not ask.
    assert all(chunk.usage is None for chunk in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed

    with_usage = list(
        client.completions.create(
            model="chat",
            prompt="The quick brown fox",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []

    rows = events()
    assert len(rows) == 3
    assert [r.request_id for r in rows] == [r.request_id for r in rows]  # unique by schema
    first, second, third = rows
    assert (first.prompt_tokens, first.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert third.completion_tokens == with_usage[-1].usage.completion_tokens
    for row in rows:
        assert row.usage_source == UsageEvent.Source.UPSTREAM
        assert row.status_code == 200
        assert row.organization_id == deployment.organization_id
        assert row.api_key_id == key.id
        assert row.deployment_id == deployment.id
        assert row.model_version_id == deployment.model_version_id
        assert row.model == "chat"
        assert row.latency_ms > 0
    assert first.ttft_ms is None
    assert second.ttft_ms is not None and 0 < second.ttft_ms <= second.latency_ms
    gateway.reset()  # a gateway that stops records when its keys were last used
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_async_client_concurrent_requests(gateway, tenant):
    _deployment, _key, secret = tenant

    async def run():
        client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
        plain = [
            client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=6)
            for _ in range(4)
        ]

        async def stream():
            response = await client.chat.completions.create(
                model="chat",
                messages=MESSAGES,
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in response]

        results = await asyncio.gather(*plain, *(stream() for _ in range(4)))
        await client.close()
        return results

    results = asyncio.run(run())
    replies, streams = results[:4], results[4:]
    assert all(reply.choices[0].message.content for reply in replies)
    assert all(chunks[-1].usage.completion_tokens >= 1 for chunks in streams)
    rows = events()
    assert len(rows) == 8
    expected = sorted(
        [r.usage.completion_tokens for r in replies]
        + [s[-1].usage.completion_tokens for s in streams]
    )
    assert sorted(r.completion_tokens for r in rows) == expected


def test_models_lists_only_what_the_key_may_call(
    gateway, tenant, other_organization, make_deployment
):
    _deployment, _key, secret = tenant
    make_deployment(other_organization, name="secret-project", endpoints=["http://127.0.0.1:9"])
    client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
    assert [m.id for m in client.models.list()] == ["chat"]
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="secret-project", messages=MESSAGES)
    assert "secret-project" in raised.value.message  # the name as sent, nothing more
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("secret-project")
    assert events() == []
