"""A partner model's provider turned hostile, against the running gateway and the fake provider
process (tests/fakeprovider.py): a stream that never ends, one that trickles forever, a line or
a body of 50 MB, usage figures that are negative or absurd. Each is bounded (output, time,
memory), answered in OpenAI's error format, and billed once, never past what the request
allowed. (A stream event that is not JSON: tests/gateway/test_partner.py.)"""

import time

import httpx
import orjson
import pytest

from metering.models import UsageEvent
from tests.partner import (
    MESSAGES,
    enable_partner_model,
    make_partner_model,
    partner_chat,
    partner_stream,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def secret(gateway, provider, organization, inference_key):
    version, _connection = make_partner_model(provider.base_url, timeout_seconds=5)
    enable_partner_model(organization, version)
    return inference_key(organization)[1]


def stream(gateway, secret, **body) -> tuple[list[str], str, list[dict]]:
    """The content the client received, the stream's last event, and the chunks before it."""
    lines = [line[5:].strip() for line in partner_stream(gateway, secret, **body)]
    chunks = [orjson.loads(line) for line in lines[:-1]]
    content = [
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    ]
    return content, lines[-1], chunks


def the_one_event() -> UsageEvent:
    (event,) = UsageEvent.objects.all()
    return event


def let_go(provider) -> bool:
    """Whether the gateway hung up on the provider mid-answer (within a few seconds)."""
    deadline = time.monotonic() + 5
    while not provider.received()[-1]["aborted"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_stream_that_ignores_max_tokens_is_cut_and_billed_for_what_was_allowed(
    gateway, provider, secret
):
    provider.control(mode="forever")
    started = time.monotonic()
    content, last, _chunks = stream(gateway, secret, max_tokens=8)
    elapsed = time.monotonic() - started
    error = orjson.loads(last)["error"]
    assert error["code"] == "provider_bad_response" and "max_tokens" in error["message"]
    # Cut once the gateway's count of what it relayed passed twice the 8 tokens allowed (+16):
    # a few dozen words, not an endless stream.
    assert 8 < len(content) <= 2 * 8 + 16 and elapsed < 10
    assert let_go(provider)
    event = the_one_event()
    assert event.status_code == 502 and event.usage_source == UsageEvent.Source.COUNTED
    assert event.completion_tokens == 8  # never billed past what the request allowed
    assert event.prompt_tokens > 0


def test_a_stream_that_trickles_forever_ends_at_the_answer_timeout(gateway, provider, secret):
    gateway.reset(answer_timeout=2)
    provider.control(mode="trickle", delay_seconds=0.2)  # well within the 5 s idle timeout
    started = time.monotonic()
    _content, last, _chunks = stream(gateway, secret)
    elapsed = time.monotonic() - started
    error = orjson.loads(last)["error"]
    assert error["code"] == "provider_timeout" and "2s" in error["message"]
    assert 2 <= elapsed < 5
    assert let_go(provider)
    event = the_one_event()
    assert event.status_code == 504 and event.completion_tokens == 0


def test_a_50_mb_stream_line_is_cut_without_being_held(gateway, provider, secret):
    provider.control(mode="huge", huge_bytes=50_000_000)
    _content, last, _chunks = stream(gateway, secret)
    error = orjson.loads(last)["error"]
    assert error["code"] == "provider_bad_response" and "MiB" in error["message"]
    assert let_go(provider)
    event = the_one_event()
    assert event.status_code == 502 and event.completion_tokens == 0


def test_a_50_mb_answer_is_a_502_and_billed_nothing(gateway, provider, secret):
    provider.control(mode="huge", huge_bytes=50_000_000)
    response = partner_chat(gateway, secret, max_tokens=5)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "provider_bad_response" and error["type"] == "server_error"
    assert let_go(provider)
    event = the_one_event()
    assert event.status_code == 502 and event.prompt_tokens == event.completion_tokens == 0


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": -1_000_000},
        {"completion_tokens": 2_000_000_000, "total_tokens": 2_000_000_005},
        {"prompt_tokens": 3_000_000_000},
        {"completion_tokens": "5"},
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_negative_or_absurd_usage_is_replaced_by_the_gateways_count(
    gateway, provider, secret, usage, streamed
):
    provider.control(usage=usage)
    if streamed:
        content, last, chunks = stream(
            gateway, secret, max_tokens=5, stream_options={"include_usage": True}
        )
        seen = chunks[-1]["usage"]
        assert last == "[DONE]" and "".join(content).startswith("Bonjour")
    else:
        response = partner_chat(gateway, secret, max_tokens=5)
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(response.content))
        seen = response.json()["usage"]
    event = the_one_event()
    assert event.status_code == 200 and event.usage_source == UsageEvent.Source.COUNTED
    # The gateway's own count: the prompt's words and the five words relayed (estimated at
    # a token per 4 bytes, this model having no tokenizer files), at most max_tokens.
    assert 0 < event.prompt_tokens < 100
    assert 0 < event.completion_tokens <= 5
    # And the client is shown what it is billed, not the provider's figures.
    assert seen == {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def test_usage_within_bounds_is_the_providers(gateway, provider, secret):
    # A provider that counts a few more tokens than the gateway would (its own system prompt)
    # is believed: only figures no request of this size could use are replaced.
    provider.control(usage={"prompt_tokens": 40})
    response = partner_chat(gateway, secret, max_tokens=5)
    assert response.status_code == 200
    event = the_one_event()
    assert (event.prompt_tokens, event.completion_tokens) == (40, 5)
    assert event.usage_source == UsageEvent.Source.UPSTREAM
    assert response.json()["usage"]["prompt_tokens"] == 40  # passed on as the provider sent it


def test_a_streamed_usage_within_bounds_reaches_the_client_after_the_last_text(
    gateway, provider, secret
):
    provider.control(usage={"prompt_tokens": 40})
    content, last, chunks = stream(
        gateway, secret, max_tokens=5, stream_options={"include_usage": True}
    )
    seen = chunks[-1]["usage"]
    assert last == "[DONE]" and "".join(content).startswith("Bonjour")
    assert (seen["prompt_tokens"], seen["completion_tokens"]) == (40, 5)
    # On a chunk of its own, the last before [DONE], as OpenAI sends it (the provider, like
    # Mistral's API, put it on its last content chunk).
    assert chunks[-1]["choices"] == []
    event = the_one_event()
    assert (event.prompt_tokens, event.completion_tokens) == (40, 5)


def test_a_client_that_hangs_up_while_its_usage_is_held_is_billed_once_for_what_it_got(
    gateway, provider, secret
):
    # The client asks for usage, then leaves after the first words: the provider's usage
    # (held back until the end) never reaches it, and it is billed once, for what it received.
    provider.control(delay_seconds=0.3, usage={"completion_tokens": 2_000_000_000})
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        json={
            "model": "large",
            "messages": MESSAGES,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"Bonjour' in line:
                break  # leaving the block closes the connection mid-stream
    assert let_go(provider)
    deadline = time.monotonic() + 10
    while not UsageEvent.objects.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more arrives
    event = the_one_event()
    assert event.status_code == 499
    assert 0 < event.completion_tokens <= 5
