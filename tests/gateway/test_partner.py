"""A partner-hosted model through the gateway to a fake Mistral API process (tests/fakeprovider.py):
the openai SDK streaming and not, usage from the provider's report (counted only when it gives
none), the provider's errors as ours, terms required, the provider-wide quota shared fairly
between organizations, and the credential in no response or log line."""

import logging
import time

import openai
import orjson
import pytest

from accounts.actors import Actor
from accounts.roles import Role
from billing.invoicing import invoice_draft
from billing.ledger import usage_events_ingest
from billing.models import UsageRecord
from catalog import terms
from catalog.permissions import operator_system_actor
from metering.models import UsageEvent
from tests.factories import OrganizationFactory
from tests.partner import (
    MESSAGES,
    OUR_PRICE,
    PROVIDER_COST,
    PROVIDER_KEY,
    PROVIDER_MODEL_ID,
    enable_partner_model,
    make_partner_model,
    partner_chat,
    partner_stream,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def partner(gateway, provider, organization, inference_key):
    version, connection = make_partner_model(provider.base_url)
    enable_partner_model(organization, version)
    _key, secret = inference_key(organization)
    client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
    return version, connection, client, secret


def events():
    return list(UsageEvent.objects.order_by("started_at"))


def test_the_openai_sdk_calls_a_partner_model_like_any_model(
    gateway, provider, partner, organization, caplog
):
    caplog.set_level(logging.DEBUG)
    version, connection, client, _secret = partner

    reply = client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=5, seed=7)
    assert reply.choices[0].message.content.startswith("Bonjour")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 5)

    chunks = list(
        client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=4, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert all(chunk.usage is None for chunk in chunks)  # not asked for, not passed on

    with_usage = list(
        client.chat.completions.create(
            model="large",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    reported = [chunk.usage for chunk in with_usage if chunk.usage]
    assert [(u.prompt_tokens, u.completion_tokens) for u in reported] == [(5, 3)]

    rows = events()
    assert [(e.prompt_tokens, e.completion_tokens, e.status_code) for e in rows] == [
        (5, 5, 200),
        (5, 4, 200),
        (5, 3, 200),
    ]
    assert {e.usage_source for e in rows} == {UsageEvent.Source.UPSTREAM}
    assert {e.provider_connection_id for e in rows} == {connection.pk}
    assert {e.model_version_id for e in rows} == {version.pk}

    # What the provider received: its own model id, Mistral's parameter names, no
    # stream_options (Mistral refuses unknown fields with a 422), our credential.
    received = provider.received()
    assert all(r["authorized"] for r in received)
    assert {r["body"]["model"] for r in received} == {PROVIDER_MODEL_ID}
    assert received[0]["body"]["random_seed"] == 7 and "seed" not in received[0]["body"]
    assert all("stream_options" not in r["body"] for r in received)
    assert PROVIDER_KEY not in caplog.text

    # Billed per token at our price, on lines of its own, with the provider's cost recorded.
    usage_events_ingest()
    draft = invoice_draft(organization=organization)
    lines = {line.description: line for line in draft.lines}
    label = "mistral-large:24.11 (hosted by Mistral AI)"
    assert lines[f"{label} — input tokens"].ledger_quantity == 15
    assert lines[f"{label} — input tokens"].unit_price == OUR_PRICE[0]
    assert lines[f"{label} — output tokens"].ledger_quantity == 12
    assert lines[f"{label} — output tokens"].unit_price == OUR_PRICE[1]
    recorded = UsageRecord.objects.filter(organization=organization)
    assert {r.provider_connection_id for r in recorded} == {connection.pk}
    assert (
        sum(r.provider_cost for r in recorded)
        == (15 * PROVIDER_COST[0] + 12 * PROVIDER_COST[1]) / 1_000_000
    )


def test_new_terms_must_be_accepted_before_calling_again(
    gateway, provider, organization, inference_key
):
    version, _connection = make_partner_model(provider.base_url)
    enable_partner_model(organization, version)  # accepts terms version "1"
    terms.terms_publish(
        actor=operator_system_actor(),
        version=version,
        terms_version="2",
        title="New terms",
        body="Read again.",
    )
    _key, secret = inference_key(organization)
    client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=2)
    error = refused.value.body
    assert refused.value.status_code == 403 and error["code"] == "terms_not_accepted"
    assert "version 2" in error["message"] and "terms/accept" in error["message"]
    assert provider.received() == [] and events() == []
    terms.terms_accept(
        actor=Actor(organization=organization, role=Role.OWNER), version=version, terms_version="2"
    )
    # Within the gateway's route cache (0.2 s in tests, served stale while it is re-read).
    deadline = time.monotonic() + 5
    while True:
        try:
            assert client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=2)
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_provider_errors_become_ours(gateway, provider, partner):
    _version, _connection, client, secret = partner
    provider.control(mode="rate_limit", retry_after=7)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=2)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["code"] == "provider_rate_limited"

    provider.control(mode="fail", status=503)
    failed = partner_chat(gateway, secret)
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "provider_error"
    assert failed.json()["error"]["type"] == "server_error"

    provider.control(mode="garbage")
    garbage = partner_chat(gateway, secret)
    assert garbage.status_code == 502
    assert garbage.json()["error"]["code"] == "provider_bad_response"

    provider.control(mode="fail", status=401)
    refused = partner_chat(gateway, secret)
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "provider_auth_failed"
    for response in (failed, garbage, refused):
        assert PROVIDER_KEY not in response.text
    assert [e.status_code for e in events()] == [429, 502, 502, 502]
    assert all(e.prompt_tokens == e.completion_tokens == 0 for e in events())


def test_a_cut_stream_or_garbage_is_a_502_billed_for_what_was_delivered(gateway, provider, partner):
    _version, _connection, _client, secret = partner
    provider.control(mode="cut", cut_after=3)
    lines = partner_stream(gateway, secret)
    assert '"provider_stream_broken"' in lines[-1] and lines[-1] != "data: [DONE]"
    provider.control(mode="garbage")
    lines = partner_stream(gateway, secret)
    assert '"provider_bad_response"' in lines[-1]
    cut, garbage = events()
    assert cut.status_code == 502 and cut.usage_source == UsageEvent.Source.COUNTED
    assert cut.completion_tokens > 0  # the three words the client received, counted
    assert garbage.status_code == 502 and garbage.completion_tokens > 0


def test_usage_is_counted_and_marked_when_the_provider_reports_none(gateway, provider, partner):
    _version, _connection, client, _secret = partner
    provider.control(mode="no_usage")
    reply = client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content
    list(
        client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=4, stream=True)
    )
    rows = events()
    assert {e.usage_source for e in rows} == {UsageEvent.Source.COUNTED}
    assert all(e.completion_tokens > 0 and e.prompt_tokens > 0 for e in rows)


def test_a_provider_that_stalls_before_its_first_byte_is_a_504(
    gateway, provider, organization, inference_key
):
    version, _connection = make_partner_model(provider.base_url, timeout_seconds=1)
    enable_partner_model(organization, version)
    _key, secret = inference_key(organization)
    provider.control(mode="stall", stall_seconds=3)
    response = partner_chat(gateway, secret)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "provider_timeout"


def test_the_provider_quota_is_shared_fairly_between_organizations(
    gateway, provider, organization, inference_key
):
    # Our quota with the provider: 10 requests a minute; one organization may hold half.
    version, _connection = make_partner_model(
        provider.base_url, requests_per_minute=10, tenant_share_percent=50
    )
    greedy, polite = organization, OrganizationFactory()
    secrets = {}
    for tenant in (greedy, polite):
        enable_partner_model(tenant, version)
        secrets[tenant.pk] = inference_key(tenant)[1]
    greedy_codes = [partner_chat(gateway, secrets[greedy.pk]).status_code for _ in range(8)]
    assert greedy_codes == [200] * 5 + [429] * 3
    refused = partner_chat(gateway, secrets[greedy.pk])
    assert "share" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]
    # The greedy tenant used its share, not everyone's quota: the other still gets its half.
    polite_codes = [partner_chat(gateway, secrets[polite.pk]).status_code for _ in range(5)]
    assert polite_codes == [200] * 5
    assert len(provider.received()) == 10


def test_our_key_limits_apply_to_partner_models_too(gateway, provider, organization, inference_key):
    version, _connection = make_partner_model(provider.base_url)
    enable_partner_model(organization, version)
    _key, secret = inference_key(organization, rpm_limit=2)
    codes = [partner_chat(gateway, secret).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    refused = partner_chat(gateway, secret)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "API key" in refused.json()["error"]["message"]
    assert len(provider.received()) == 2


@pytest.mark.nodb
def test_what_each_kind_of_provider_is_sent():
    from catalog.credentials import Secret
    from catalog.providers import PartnerTarget
    from gateway import partner
    from gateway.protocol import parse_request

    def target(kind):
        return PartnerTarget(
            connection_id=1,
            connection_name="p",
            kind=kind,
            base_url="https://provider.test/v1",
            provider_model_id="their-model",
            credential=Secret("s3cr3t-value"),
            requests_per_minute=None,
            tokens_per_minute=None,
            tenant_share_percent=50,
            timeout_seconds=10,
        )

    body = (
        b'{"model": "large", "messages": [{"role": "user", "content": "hi"}], "stream": true,'
        b' "stream_options": {"include_usage": false}, "seed": 3, "user": "u1",'
        b' "max_completion_tokens": 5}'
    )
    request = parse_request(body, chat=True)
    mistral = orjson.loads(partner.request_body(request, target("mistral")))
    assert mistral["model"] == "their-model" and mistral["random_seed"] == 3
    assert mistral["max_tokens"] == 5
    assert not {"stream_options", "seed", "user", "max_completion_tokens"} & set(mistral)
    compatible = orjson.loads(partner.request_body(request, target("openai_compatible")))
    # Asked for usage on the last chunk (what gets billed), never vLLM's continuous extension.
    assert compatible["stream_options"] == {"include_usage": True}
    assert compatible["seed"] == 3 and compatible["model"] == "their-model"
    assert partner.request_headers(target("mistral"))["authorization"] == "Bearer s3cr3t-value"
    assert "s3cr3t" not in repr(target("mistral"))


def test_embeddings_of_a_partner_model_are_refused_before_anything_is_sent(provider, partner):
    _version, _connection, client, _secret = partner
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="large", input="Bonjour")
    assert refused.value.body["param"] == "model"
    assert refused.value.body["code"] == "unsupported_model_task"
    assert events() == []
