"""POST /v1/embeddings with the official openai SDK through the real gateway to a real runtime
process serving the tiny embedding model: shapes, batching, base64, dimensions, exactly one
usage event per request (input tokens only), limits and budgets, and its own invoice line."""

import asyncio
import base64
import threading
import time
from decimal import Decimal

import httpx
import numpy as np
import openai
import pytest

from accounts.actors import Actor
from accounts.roles import Role
from billing.invoicing import invoice_draft
from billing.ledger import usage_events_ingest
from billing.models import InvoiceLine
from catalog import terms
from catalog.permissions import operator_system_actor
from gateway.tokens import ModelTokenizer
from metering.models import UsageEvent
from runtime.tiny_embedding import CONTEXT_LENGTH, HIDDEN_SIZE
from tests.catalog.factories import TokenPriceFactory
from tests.deployments.factories import ReplicaFactory
from tests.gateway.conftest import EMBEDDING_SERVED_NAME

pytestmark = pytest.mark.slow

TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "Grüße aus Köln 🙂"]
PRICE = Decimal("0.020000")  # per million input tokens


@pytest.fixture
def tenant(
    gateway, organization, inference_key, make_deployment, embedding_runtime, tiny_embedding_dir
):
    deployment = make_deployment(
        organization,
        name="vectors",
        endpoints=[embedding_runtime],
        served_model_name=EMBEDDING_SERVED_NAME,
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_embedding_dir)  # the gateway's tokenizer reads it
    version.runtime_args = {"max_model_len": CONTEXT_LENGTH}
    version.save(update_fields=["artifact_uri", "runtime_args"])
    model = version.model
    model.tasks = ["embeddings"]
    model.save(update_fields=["tasks"])
    TokenPriceFactory(model_version=version, input_per_million=PRICE, output_per_million=Decimal(0))
    key, secret = inference_key(organization)
    client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
    return deployment, key, secret, client


def test_shape_batching_base64_and_one_usage_event_each(tenant, tiny_embedding_dir):
    deployment, key, _secret, client = tenant
    floats = client.embeddings.create(model="vectors", input=TEXTS, encoding_format="float")
    assert floats.object == "list"
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert all(len(d.embedding) == HIDDEN_SIZE for d in floats.data)
    assert np.allclose(np.linalg.norm([d.embedding for d in floats.data], axis=1), 1, atol=1e-5)
    # The gateway's count (admission, and billing when a replica reports none) is the runtime's.
    tokenizer = ModelTokenizer(tiny_embedding_dir)
    counted = sum(tokenizer.count_input(text) for text in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == counted

    # The SDK's default: base64, which it decodes; the vectors are the same floats.
    decoded = client.embeddings.create(model="vectors", input=TEXTS)
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    raw = client.embeddings.with_raw_response.create(
        model="vectors", input=TEXTS, encoding_format="base64"
    ).http_response
    assert raw.headers["x-request-id"].startswith("req_")
    first = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert first.tolist() == floats.data[0].embedding

    single = client.embeddings.create(model="vectors", input=TEXTS[0], dimensions=64)
    assert len(single.data) == 1 and len(single.data[0].embedding) == 64
    tokens = client.embeddings.create(model="vectors", input=[[5, 6, 7], [8, 9]])
    assert tokens.usage.prompt_tokens == 5

    rows = list(UsageEvent.objects.order_by("started_at"))
    assert len(rows) == 5
    expected = [counted, counted, counted, tokenizer.count_input(TEXTS[0]), 5]
    assert [r.prompt_tokens for r in rows] == expected
    for row in rows:
        assert (row.completion_tokens, row.status_code) == (0, 200)
        assert row.usage_source == UsageEvent.Source.UPSTREAM
        assert (row.deployment_id, row.api_key_id) == (deployment.id, key.id)
        assert row.model == "vectors"


def test_concurrent_requests_each_get_their_rows_and_one_event(tenant):
    _deployment, _key, secret, client = tenant
    texts = [f"sentence {i} " * (1 + i % 5) for i in range(12)]
    alone = [
        client.embeddings.create(model="vectors", input=t, encoding_format="float")
        .data[0]
        .embedding
        for t in texts
    ]

    async def run():
        async with openai.AsyncOpenAI(
            base_url=client.base_url, api_key=secret, max_retries=0
        ) as async_client:
            return await asyncio.gather(
                *(
                    async_client.embeddings.create(model="vectors", input=[t, "a partner"])
                    for t in texts
                )
            )

    together = asyncio.run(run())
    assert np.allclose([r.data[0].embedding for r in together], alone, atol=1e-5)
    assert UsageEvent.objects.count() == 2 * len(texts)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", None),
        ({"input": []}, "input", None),
        ({"input": ["fine", ""]}, "input[1]", None),
        ({"input": ["fine", 3]}, "input[1]", None),
        ({"input": [["nested"]]}, "input[0]", None),
        ({"input": ["x"] * 2049}, "input", None),
        ({"input": [-1]}, "input[0]", None),
        ({"input": [[1, -2]]}, "input[0]", None),
        ({"input": [True]}, "input[0]", None),
        ({"input": [[1], [[2]]]}, "input[1]", None),
        ({"input": [[]]}, "input[0]", None),
        ({"input": "word " * CONTEXT_LENGTH}, "input", "context_length_exceeded"),
        ({"input": "fine", "encoding_format": "hex"}, "encoding_format", None),
        ({"input": "fine", "dimensions": "64"}, "dimensions", None),
        ({"input": "fine", "user": 7}, "user", None),
        ({}, "input", None),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter_before_any_replica(
    gateway, tenant, body, param, code
):
    deployment, _key, secret, client = tenant

    async def load_tokenizer():  # counted exactly, the context check is the gateway's own
        return await (await gateway.app.startup()).tokenizers.get(deployment.model_version_id)

    assert gateway.server.call(load_tokenizer()) is not None
    response = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": "vectors", **body},
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["code"] == code
    assert UsageEvent.objects.count() == 0  # refused before a replica: nothing to bill


def test_a_replica_refusal_reaches_the_client_and_bills_nothing(tenant):
    _deployment, _key, _secret, client = tenant
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="vectors", input="fine", dimensions=48)
    assert refused.value.body["param"] == "dimensions"
    row = UsageEvent.objects.get()
    assert (row.status_code, row.prompt_tokens, row.completion_tokens) == (400, 0, 0)


def test_a_token_id_past_the_vocabulary_is_the_replicas_400_and_bills_nothing(tenant):
    _deployment, _key, _secret, client = tenant
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="vectors", input=[[1, 2**62]])
    assert refused.value.body["param"].startswith("input")
    row = UsageEvent.objects.get()
    assert (row.status_code, row.prompt_tokens, row.completion_tokens) == (400, 0, 0)


def test_token_limits_and_the_spend_limit_apply(gateway, tenant, organization, inference_key):
    _deployment, _key, _secret, client = tenant
    _small, secret = inference_key(organization, tpm_limit=10)
    limited = openai.OpenAI(base_url=client.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        limited.embeddings.create(model="vectors", input="word " * 20)
    limited.embeddings.create(model="vectors", input="two words")  # 4 tokens: admitted

    organization.monthly_spend_limit = 0
    organization.save(update_fields=["monthly_spend_limit"])
    gateway.reset()  # the spend position is cached for a few seconds
    _fresh, secret = inference_key(organization)
    broke = openai.OpenAI(base_url=client.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        broke.embeddings.create(model="vectors", input="fine")
    assert refused.value.code == "insufficient_quota"
    assert UsageEvent.objects.count() == 1


def test_usage_is_priced_per_input_token_on_an_embedding_line(tenant, organization):
    deployment, _key, _secret, client = tenant
    reply = client.embeddings.create(model="vectors", input=TEXTS * 10)
    usage_events_ingest()
    draft = invoice_draft(organization=organization)
    (line,) = draft.lines
    assert line.kind == InvoiceLine.Kind.EMBEDDING_TOKENS
    assert line.model_version_id == deployment.model_version_id
    assert "embedding tokens" in line.description
    assert line.ledger_quantity == reply.usage.prompt_tokens
    assert line.unit_price == PRICE
    assert line.amount_exact == PRICE * reply.usage.prompt_tokens / 1_000_000


def test_a_large_body_is_read_and_counted_in_a_prompt_worker(gateway, tenant, tiny_embedding_dir):
    _deployment, _key, _secret, client = tenant
    gateway.reset(inline_prompt_bytes=64)  # every body here is "large"
    inputs = TEXTS * 5
    reply = client.embeddings.create(model="vectors", input=inputs, encoding_format="float")
    tokenizer = ModelTokenizer(tiny_embedding_dir)
    assert reply.usage.prompt_tokens == sum(tokenizer.count_input(t) for t in inputs)
    assert len(reply.data) == len(inputs)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="vectors", input=["long enough to be pooled", ""])
    assert refused.value.body["param"] == "input[1]"
    assert UsageEvent.objects.get().prompt_tokens == reply.usage.prompt_tokens


def test_a_request_from_zero_replicas_waits_for_one_and_is_served(
    gateway, tenant, organization, make_deployment, embedding_runtime
):
    """The first vector of a pool that scaled to zero: the gateway asks for a replica, waits
    for it (re-reading the route by the name called) and answers 200, billed once."""
    _deployment, _key, _secret, client = tenant
    gateway.reset(scale_from_zero_wait=20)
    cold = make_deployment(
        organization,
        name="cold-vectors",
        served_model_name=EMBEDDING_SERVED_NAME,
        min_replicas=0,
        max_replicas=1,
        desired_replicas=0,
    )

    def replica_comes_up():
        time.sleep(1.2)
        ReplicaFactory(deployment=cold, endpoint=embedding_runtime)

    threading.Thread(target=replica_comes_up).start()
    reply = client.embeddings.create(model="cold-vectors", input=TEXTS, encoding_format="float")
    assert len(reply.data) == len(TEXTS) and reply.usage.prompt_tokens > 0
    cold.refresh_from_db()
    assert cold.desired_replicas == 1  # the gateway asked the control plane for one
    row = UsageEvent.objects.get()
    assert (row.deployment_id, row.status_code) == (cold.id, 200)


def test_user_and_metadata_are_attributed_and_not_sent_to_the_replica(tenant):
    _deployment, _key, secret, client = tenant
    response = httpx.post(
        f"{client.base_url}embeddings",
        json={
            "model": "vectors",
            "input": "fine",
            "user": "end-user-7",
            "metadata": {"team": "search"},
        },
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text  # the runtime refuses unknown fields
    row = UsageEvent.objects.get()
    assert (row.end_user, row.tags) == ("end-user-7", {"team": "search"})
    bad = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": "vectors", "input": "fine", "metadata": {"team": 7}},
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("metadata")


def test_terms_in_force_must_be_accepted_before_any_vector(tenant, organization):
    deployment, _key, _secret, client = tenant
    terms.terms_publish(
        actor=operator_system_actor(),
        version=deployment.model_version,
        terms_version="1",
        title="Embedding terms",
        body="Read them.",
    )
    deadline = time.monotonic() + 5  # the gateway's route cache (0.2 s in tests)
    while True:
        try:
            client.embeddings.create(model="vectors", input="fine")
        except openai.PermissionDeniedError as refused:
            assert refused.body["code"] == "terms_not_accepted"
            break
        assert time.monotonic() < deadline, "served without the terms accepted"
        time.sleep(0.1)
    billed = UsageEvent.objects.count()
    terms.terms_accept(
        actor=Actor(organization=organization, role=Role.OWNER),
        version=deployment.model_version,
        terms_version="1",
    )
    deadline = time.monotonic() + 5
    while True:
        try:
            client.embeddings.create(model="vectors", input="fine")
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert UsageEvent.objects.count() == billed + 1
