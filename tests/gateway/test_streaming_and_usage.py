"""SSE relay edge cases and the exactly-once usage record: the usage chunk with or without
choices, continuous usage (asked of every replica, passed on only when the client asked), a
stream that breaks before its final usage (billed by the replica's last figure, or counted with
the model's tokenizer from a replica that reports none), a client that disconnects mid-stream
(one row, upstream cancelled), scale from zero, load reports."""

import asyncio
import json
import threading
import time

import httpx
import pytest

from deployments.models import Deployment, LoadReport
from gateway.tokens import ModelTokenizer
from metering.models import UsageEvent
from tests.deployments.factories import ReplicaFactory
from tests.gateway.conftest import RUNTIME_SERVED_NAME

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture
def tenant(gateway, organization, inference_key):
    _key, secret = inference_key(organization)
    return {"authorization": f"Bearer {secret}"}


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_usage_on_a_chunk_with_choices_is_kept_when_asked_and_stripped_when_not(
    gateway, tenant, organization, make_deployment, upstream_server
):
    make_deployment(
        organization,
        name="chat",
        endpoints=[upstream_server.url],
        served_model_name="stub-usage-in-choices",
    )
    body = {"model": "chat", "messages": CHAT, "stream": True}
    plain = httpx.post(gateway.v1 + "/chat/completions", json=body, headers=tenant)
    asked = httpx.post(
        gateway.v1 + "/chat/completions",
        json={**body, "stream_options": {"include_usage": True}},
        headers=tenant,
    )
    plain_events, asked_events = sse_data(plain.text), sse_data(asked.text)
    assert plain_events[-1] == asked_events[-1] == "[DONE]"
    assert len(plain_events) == len(asked_events) == 9  # 8 tokens + [DONE]: nothing dropped
    assert '"usage"' not in plain_events[-2] and '"completion_tokens": 8' in asked_events[-2]
    rows = UsageEvent.objects.all()
    assert [(r.prompt_tokens, r.completion_tokens, r.usage_source) for r in rows] == [
        (12, 8, "upstream")
    ] * 2


def test_continuous_usage_is_asked_for_and_reaches_only_a_client_that_asked(
    gateway, tenant, organization, make_deployment, upstream_server
):
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    body = {"model": "chat", "messages": CHAT, "stream": True}
    upstream_server.app.requests.clear()
    replies = {
        "plain": httpx.post(gateway.v1 + "/chat/completions", json=body, headers=tenant),
        "usage": httpx.post(
            gateway.v1 + "/chat/completions",
            json={**body, "stream_options": {"include_usage": True}},
            headers=tenant,
        ),
        "continuous": httpx.post(
            gateway.v1 + "/chat/completions",
            json={
                **body,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            },
            headers=tenant,
        ),
    }
    for sent in upstream_server.app.requests:
        assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    events = {name: sse_data(reply.text) for name, reply in replies.items()}
    assert all('"usage"' not in event for event in events["plain"])
    assert all('"usage"' not in event for event in events["usage"][:-2])
    assert '"completion_tokens": 8' in events["usage"][-2]  # the final usage chunk alone
    assert all('"usage"' in event for event in events["continuous"][:-1])
    rows = UsageEvent.objects.all()
    assert [(r.prompt_tokens, r.completion_tokens, r.usage_source) for r in rows] == [
        (12, 8, "upstream")
    ] * 3


def test_a_stream_that_breaks_is_billed_by_the_replicas_last_reported_figure(
    gateway, tenant, organization, make_deployment, upstream_server
):
    make_deployment(
        organization, name="chat", endpoints=[upstream_server.url], served_model_name="stub-break"
    )
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
    )
    events = sse_data(response.text)
    assert '"server_error"' in events[-1] and "stream" in events[-1]
    assert all('"usage"' not in event for event in events)  # the client did not ask
    row = UsageEvent.objects.get()
    assert row.usage_source == UsageEvent.Source.UPSTREAM_PARTIAL
    assert (row.status_code, row.prompt_tokens, row.completion_tokens) == (502, 12, 3)


def test_a_stream_that_breaks_before_any_usage_is_counted_with_the_models_tokenizer(
    gateway, tenant, organization, make_deployment, upstream_server, tiny_moe_dir
):
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[upstream_server.url],
        served_model_name="stub-legacy-break",
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_moe_dir)
    version.save(update_fields=["artifact_uri"])
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
    )
    events = sse_data(response.text)
    assert '"server_error"' in events[-1] and "stream" in events[-1]
    row = UsageEvent.objects.get()
    tokenizer = ModelTokenizer(tiny_moe_dir)
    assert row.usage_source == UsageEvent.Source.COUNTED
    assert row.status_code == 502
    assert row.completion_tokens == tokenizer.count_text("Hello, world")  # 3 chunks streamed
    assert row.prompt_tokens == tokenizer.count_chat(CHAT)


def test_a_broken_stream_of_tool_calls_bills_the_calls_it_relayed(
    gateway, tenant, organization, make_deployment, upstream_server, tiny_moe_dir
):
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[upstream_server.url],
        served_model_name="stub-tools-legacy-break",
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_moe_dir)
    version.save(update_fields=["artifact_uri"])
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
    )
    assert '"tool_calls"' in response.text
    row = UsageEvent.objects.get()
    assert row.usage_source == UsageEvent.Source.COUNTED
    # The call's name and the arguments streamed before the break are generated tokens.
    tokenizer = ModelTokenizer(tiny_moe_dir)
    assert row.completion_tokens == tokenizer.count_text("lookupHello, world")


def test_a_broken_stream_of_reasoning_bills_the_thinking_it_relayed(
    gateway, tenant, organization, make_deployment, upstream_server, tiny_moe_dir
):
    """A reasoning model's thinking (vLLM's `reasoning_content` or `reasoning` deltas, Mistral's
    `thinking` content parts) is
    generated tokens: a stream cut before the replica's usage bills it, not zero."""
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[upstream_server.url],
        served_model_name="stub-reasoning-legacy-break",
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_moe_dir)
    version.save(update_fields=["artifact_uri"])
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
    )
    assert '"reasoning_content"' in response.text
    row = UsageEvent.objects.get()
    assert row.usage_source == UsageEvent.Source.COUNTED
    assert row.completion_tokens == ModelTokenizer(tiny_moe_dir).count_text("Hello, world")


def test_client_disconnect_mid_stream_cancels_upstream_and_leaves_one_row(
    gateway, tenant, organization, make_deployment, runtime_process
):
    make_deployment(
        organization,
        name="chat",
        endpoints=[runtime_process],
        served_model_name=RUNTIME_SERVED_NAME,
        model_version__runtime_args={"max_model_len": 2048},
    )
    received = 0
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            gateway.v1 + "/chat/completions",
            json={"model": "chat", "messages": CHAT, "stream": True, "max_tokens": 1500},
            headers=tenant,
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    received += 1  # a chunk of text: one token or more
            if received >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while not UsageEvent.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = UsageEvent.objects.get()
    assert row.status_code == 499
    # The runtime reports usage on every chunk: the last figure is billed, not a re-count.
    assert row.usage_source == UsageEvent.Source.UPSTREAM_PARTIAL
    assert received <= row.completion_tokens < 1500
    assert row.prompt_tokens > 0
    # The runtime stopped generating for it: nothing is left running there.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(runtime_process + "/metrics").text
        running = [
            line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")
        ]
        if running and all(line.endswith(" 0.0") for line in running):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the runtime still generates: {running}")
    time.sleep(0.5)
    assert UsageEvent.objects.count() == 1


def test_scale_from_zero_holds_the_request_and_streams_progress(
    gateway, tenant, organization, make_deployment, upstream_server
):
    gateway.reset(scale_from_zero_wait=20, scale_progress_interval=0.3)
    deployment = make_deployment(
        organization, name="chat", min_replicas=0, max_replicas=1, desired_replicas=0
    )

    def replica_comes_up():
        time.sleep(1.2)
        ReplicaFactory(deployment=deployment, endpoint=upstream_server.url)

    threading.Thread(target=replica_comes_up).start()
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
        timeout=30,
    )
    assert response.status_code == 200
    comments = [line for line in response.text.splitlines() if line.startswith(":")]
    assert len(comments) >= 2 and "waiting for a replica of chat" in comments[0]
    assert sse_data(response.text)[-1] == "[DONE]"
    deployment.refresh_from_db()
    assert deployment.desired_replicas == 1  # the gateway asked the control plane for one
    assert UsageEvent.objects.get().status_code == 200


def test_scale_from_zero_wait_runs_out_with_503_and_retry_after(
    gateway, tenant, organization, make_deployment
):
    gateway.reset(scale_from_zero_wait=0.5)
    make_deployment(organization, name="chat", min_replicas=0, max_replicas=1, desired_replicas=0)
    response = httpx.post(
        gateway.v1 + "/chat/completions", json={"model": "chat", "messages": CHAT}, headers=tenant
    )
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert "became ready within" in response.json()["error"]["message"]
    assert Deployment.objects.get(name="chat").desired_replicas == 1
    assert not UsageEvent.objects.exists()


def test_in_flight_is_reported_for_the_autoscaler_and_metrics(
    gateway, tenant, organization, make_deployment, upstream_server
):
    deployment = make_deployment(
        organization, name="chat", endpoints=[upstream_server.url], served_model_name="stub-slow"
    )

    async def streams():
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "chat", "messages": CHAT, "stream": True}
            await asyncio.gather(
                *(
                    client.post(gateway.v1 + "/chat/completions", json=body, headers=tenant)
                    for _ in range(3)
                )
            )

    asyncio.run(streams())  # three streams of ~2 s each, side by side
    deadline = time.monotonic() + 5
    while not LoadReport.objects.filter(deployment=deployment).exists():
        assert time.monotonic() < deadline, "no load report"
        time.sleep(0.1)
    report = LoadReport.objects.get(deployment=deployment)
    assert report.source.startswith("gateway:")
    assert report.last_request_at is not None
    assert report.in_flight_average > 0.5  # three streams were in flight for seconds
    metrics = httpx.get(gateway.url + "/metrics").text
    label = f'deployment="{deployment.id}"'
    assert f"sirocco_gateway_in_flight_requests{{{label}}} 0.0" in metrics
    assert f'sirocco_gateway_requests_total{{{label},status="200"}} 3.0' in metrics
    assert f"sirocco_gateway_time_to_first_token_seconds_count{{{label}}} 3.0" in metrics
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/readyz").json()["checks"]["database"] == "ok"


def test_first_byte_and_idle_timeouts_are_504_and_still_leave_one_row(
    gateway, tenant, organization, make_deployment, upstream_server
):
    gateway.reset(first_byte_timeout=0.3, idle_timeout=0.005)
    make_deployment(
        organization, name="hang", endpoints=[upstream_server.url], served_model_name="stub-hang"
    )
    make_deployment(
        organization, name="slow", endpoints=[upstream_server.url], served_model_name="stub-slow"
    )
    hung = httpx.post(
        gateway.v1 + "/chat/completions", json={"model": "hang", "messages": CHAT}, headers=tenant
    )
    assert hung.status_code == 504
    assert "did not answer within" in hung.json()["error"]["message"]
    stalled = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "slow", "messages": CHAT, "stream": True},
        headers=tenant,
    )
    assert "sent nothing for" in sse_data(stalled.text)[-1]  # the stream says why it ended
    rows = {row.model: row for row in UsageEvent.objects.all()}
    assert (rows["hang"].status_code, rows["hang"].completion_tokens) == (504, 0)
    assert rows["slow"].status_code == 504
    assert rows["slow"].usage_source == UsageEvent.Source.UPSTREAM_PARTIAL
    assert rows["slow"].completion_tokens >= 1  # what was generated until the stall
