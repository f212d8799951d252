"""logprobs, n > 1 and seeds with the official openai SDK through the real gateway to a real
runtime process (the tiny MoE): OpenAI's shapes pass through, every choice is billed, and the
gateway refuses n over its configured maximum before anything is reserved."""

from decimal import Decimal

import openai
import pytest

from billing.invoicing import invoice_draft
from billing.ledger import usage_events_ingest
from billing.models import InvoiceLine
from metering.models import UsageEvent
from tests.catalog.factories import TokenPriceFactory
from tests.gateway.conftest import RUNTIME_SERVED_NAME

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]
NO_EOS = {"extra_body": {"ignore_eos": True}}


@pytest.fixture
def client(gateway, organization, inference_key, make_deployment, runtime_process, tiny_moe_dir):
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
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("1.000000"),
        output_per_million=Decimal("3.000000"),
    )
    _key, secret = inference_key(organization)
    return openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)


def test_logprobs_pass_through_and_top_1_is_the_greedy_token(client):
    reply = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, **NO_EOS,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert all(e.top_logprobs[0].token == e.token for e in content)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    text = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert text == reply.choices[0].message.content

    streamed = []
    for chunk in client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, stream=True, **NO_EOS,
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += [e.token for e in chunk.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]

    legacy = client.completions.create(
        model="chat", prompt="The quick brown fox", max_tokens=4, temperature=0, logprobs=1,
        **NO_EOS,
    )  # fmt: skip
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4
    assert UsageEvent.objects.count() == 3


def test_n_choices_are_all_returned_and_billed(client, organization):
    reply = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=5, n=3, seed=11, temperature=1.0, **NO_EOS
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 15
    again = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=5, n=3, seed=11, temperature=1.0, **NO_EOS
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]

    chunks = list(
        client.chat.completions.create(
            model="chat", messages=MESSAGES, max_tokens=5, n=3, seed=11, temperature=1.0,
            stream=True, **NO_EOS,
        )
    )  # fmt: skip
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1, 2}
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for usage

    rows = list(UsageEvent.objects.order_by("started_at"))
    assert [r.completion_tokens for r in rows] == [15, 15, 15]  # every choice, streamed too
    assert {r.prompt_tokens for r in rows} == {reply.usage.prompt_tokens}  # the prompt once
    assert all(r.usage_source == UsageEvent.Source.UPSTREAM for r in rows)
    usage_events_ingest()
    lines = {line.kind: line for line in invoice_draft(organization=organization).lines}
    assert lines[InvoiceLine.Kind.OUTPUT_TOKENS].ledger_quantity == 45
    assert lines[InvoiceLine.Kind.INPUT_TOKENS].ledger_quantity == 3 * reply.usage.prompt_tokens


def test_n_over_the_configured_maximum_is_a_400_before_anything_is_reserved(gateway, client):
    gateway.reset(max_choices=2)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2, n=3)
    assert refused.value.body["param"] == "n"
    assert "at most 2 choices" in refused.value.body["message"]
    two = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2, n=2)
    assert len(two.choices) == 2
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize(
    ("chat", "extra", "param"),
    [
        (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (True, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (True, {"logprobs": True, "top_logprobs": "5"}, "top_logprobs"),
        (True, {"top_logprobs": 5}, "top_logprobs"),
        (True, {"logprobs": "yes"}, "logprobs"),
        (False, {"logprobs": 6}, "logprobs"),
        (False, {"logprobs": 10**18}, "logprobs"),
    ],
)
def test_logprobs_out_of_bounds_are_a_400_naming_the_parameter_and_bill_nothing(
    client, chat, extra, param
):
    """A tenant asking for more alternatives per token than OpenAI's bounds (20 on chat, 5 on
    completions), or for a negative or non-integer count, gets a 400 naming the parameter
    (from the runtime, passed through), with nothing generated or billed."""
    with pytest.raises(openai.BadRequestError) as refused:
        if chat:
            client.chat.completions.create(
                model="chat", messages=MESSAGES, max_tokens=2, n=4, extra_body=extra
            )
        else:
            client.completions.create(model="chat", prompt="Hello", max_tokens=2, extra_body=extra)
    assert refused.value.body["param"] == param
    assert not UsageEvent.objects.filter(completion_tokens__gt=0).exists()
    assert not UsageEvent.objects.filter(status_code=200).exists()
