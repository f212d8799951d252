"""The publisher loop end to end, with real processes: the Django server (live, over HTTP), the
gateway under uvicorn, the builtin runtime serving the tiny MoE, and the Stripe stand-in
(localstripe, extended with Connect) delivering signed webhooks to the live server.

A publisher drafts a listing (card, version, price, terms) over REST; an operator approves it;
a customer is refused (deploy and call) until it accepts the terms, then calls the model through
the gateway with the openai SDK; the period closes; the customer's invoice and the publisher's
statement agree to the cent (and billing_reconcile finds nothing, Stripe included); the payout
transfer is created once although the first call timed out after Stripe made it and the task
runs again; Stripe's webhook marks the statement paid.
"""

import time
from datetime import timedelta
from decimal import Decimal

import httpx
import openai
import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import Invoice, InvoiceLine, PublisherStatement
from billing.money import round_money
from billing.periods import period_containing
from billing.reconcile import reconcile_period
from billing.tasks import statement_payout
from catalog.models import ModelVersion
from metering.models import UsageEvent
from tests.billing.conftest import WEBHOOK_SECRET, running_localstripe
from tests.catalog.factories import BuiltinRuntimeFactory
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
from tests.factories import OrganizationFactory
from tests.gateway.conftest import RUNTIME_SERVED_NAME

pytestmark = pytest.mark.slow

CARD = {
    "display_name": "Acme Tiny MoE",
    "hosting": "self_hosted",
    "description": "Acme's tiny mixture of experts, for the journey test.",
    "tasks": ["chat"],
    "languages": ["en"],
    "license": "Apache-2.0",
    "context_length": 4096,
    "architecture": "moe",
    "num_experts": 8,
    "experts_per_token": 2,
    "total_parameters": 10_000_000,
    "active_parameters": 4_000_000,
}
MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def key(organization, role=Role.ADMIN, scopes=(APIKey.Scope.MANAGEMENT,)) -> str:
    _key, secret = api_key_create(
        actor=Actor.system(organization), name="journey", scopes=list(scopes), role=role
    )
    return secret


class Rest:
    def __init__(self, base, secret):
        self.client = httpx.Client(
            base_url=base + "/api/v1", headers={"Authorization": f"Bearer {secret}"}, timeout=30
        )

    def post(self, path, body=None, expect=(200, 201)):
        answer = self.client.post(path, json=body or {})
        assert answer.status_code in expect, (path, answer.status_code, answer.text)
        return answer

    def get(self, path):
        answer = self.client.get(path)
        assert answer.status_code == 200, (path, answer.text)
        return answer


def wait_for(condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def localstripe():
    with running_localstripe() as base:
        yield base


def test_publisher_lists_customer_calls_period_closes_statement_agrees_payout_paid(
    gateway, live_server, runtime_process, tiny_moe_dir, localstripe
):
    BuiltinRuntimeFactory()
    operator = Rest(live_server.url, key(OrganizationFactory(slug="platform")))
    acme = OrganizationFactory(slug="acme", billing_email="payouts@acme.example")
    publisher = Rest(live_server.url, key(acme, Role.OWNER))
    buyer = OrganizationFactory(slug="buyer")
    customer = Rest(live_server.url, key(buyer))

    # 1. The publisher drafts; the operator approves each change from the review queue.
    operator.post("/publishers", {"organization": "acme", "display_name": "Acme AI"})
    publisher.post("/publishers/acme/listings", {"slug": "acme-tiny-moe"})

    def propose_and_approve(kind, payload):
        change = publisher.post(
            "/publishers/acme/listings/acme-tiny-moe/changes", {"kind": kind, "payload": payload}
        ).json()
        publisher.post(f"/listing-changes/{change['id']}/submit")
        queue = operator.get("/listing-changes?status=submitted").json()
        assert change["id"] in [c["id"] for c in queue]
        operator.post(f"/listing-changes/{change['id']}/approve")

    propose_and_approve("card", CARD)
    propose_and_approve(
        "version",
        {"version": "1.0", "serving_runtime": "builtin", "runtime_args": {"max_model_len": 2048}},
    )
    # The operator imports the weights (here: the runtime's folder) and publishes.
    version = ModelVersion.objects.get(model__slug="acme-tiny-moe", version="1.0")
    ModelVersion.objects.filter(pk=version.pk).update(
        artifact_uri=str(tiny_moe_dir), served_model_name=RUNTIME_SERVED_NAME
    )
    operator.post("/models/acme-tiny-moe/versions/1.0/publish")
    propose_and_approve(
        "price", {"version": "1.0", "input_per_million": "2500", "output_per_million": "7500"}
    )
    propose_and_approve(
        "terms",
        {"version": "1.0", "terms_version": "2026-12", "title": "Acme terms",
         "body": "Use Acme Tiny MoE kindly.", "customers_named": True},
    )  # fmt: skip
    period = period_containing(timezone.now())
    operator.post(
        "/publishers/acme/listings/acme-tiny-moe/revenue-shares",
        {"percent": "30.00", "effective_from": period.start.isoformat()},
    )
    assert customer.get("/models/acme-tiny-moe").json()["publisher"] == "Acme AI"

    # 2. The customer is refused until it accepts the terms: deploying and calling.
    refused = customer.client.post(
        "/deployments",
        json={"name": "acme", "model": "acme-tiny-moe", "type": "dedicated",
              "hardware_profile": "cpu-small"},
    )  # fmt: skip
    assert refused.status_code == 403 and refused.json()["code"] == "terms_not_accepted"
    deployment = DeploymentFactory(
        organization=buyer, name="acme", model_version=version, priced=False
    )
    ReplicaFactory(deployment=deployment, endpoint=runtime_process)
    sdk = openai.OpenAI(
        base_url=gateway.v1,
        api_key=key(buyer, scopes=(APIKey.Scope.INFERENCE,)),
        max_retries=0,
    )
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk.chat.completions.create(model="acme", messages=MESSAGES, max_tokens=8)
    assert denied.value.body["code"] == "terms_not_accepted"
    customer.post("/models/acme-tiny-moe/versions/1.0/terms/accept", {"version": "2026-12"})

    def call():
        try:
            return sdk.chat.completions.create(model="acme", messages=MESSAGES, max_tokens=12)
        except openai.PermissionDeniedError:
            return None  # the gateway's cached route still says "not accepted" for a moment

    wait_for(call, "the gateway to see the acceptance")
    list(sdk.chat.completions.create(model="acme", messages=MESSAGES, max_tokens=10, stream=True))
    sdk.chat.completions.create(model="acme", messages=MESSAGES, max_tokens=6)
    wait_for(lambda: UsageEvent.objects.filter(organization_id=buyer.pk).count() == 3, "usage")

    # 3. The period closes (as if its end had come); Stripe is on, as in production.
    with override_settings(
        STRIPE_API_KEY="sk_test_sirocco",
        STRIPE_API_BASE=localstripe,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_TIMEOUT_SECONDS=1.0,
    ):
        httpx.post(
            f"{localstripe}/_config/webhooks/sirocco",
            json={
                "url": f"{live_server.url}/api/v1/billing/stripe/webhook",
                "secret": WEBHOOK_SECRET,
                "events": ["transfer.created", "transfer.reversed"],
            },
        ).raise_for_status()
        usage_events_ingest()
        billing_period_close(period_start=period.start, now=period.end + timedelta(minutes=1))

        [invoice] = Invoice.objects.filter(organization=buyer)
        statement = PublisherStatement.objects.get(publisher__organization=acme)
        lines = InvoiceLine.objects.filter(invoice=invoice, model_version_id=version.pk)
        invoiced = sum((line.amount for line in lines), Decimal(0))
        assert invoiced > 0 and statement.revenue == invoiced == invoice.subtotal
        assert statement.share == round_money(invoiced * Decimal("0.30"), "USD")
        assert statement.payout_status == "pending"  # no connected account yet
        usage = sum(e.prompt_tokens for e in UsageEvent.objects.filter(organization_id=buyer.pk))
        assert statement.lines.get().input_tokens == usage
        report = reconcile_period(period, check_stripe=True)
        assert report.differences == [], report.differences
        invoice.refresh_from_db()
        assert invoice.stripe_status == "synced"  # pushed to Stripe on commit of the close

        # 4. The publisher links its account; Stripe makes the transfer but answers too late.
        httpx.post(
            f"{localstripe}/_config/delay",
            json={"path": "/v1/transfers", "seconds": 2, "count": 1},
        )
        onboarding = publisher.post(
            "/publishers/acme/payout-account",
            {"refresh_url": "https://console.example/r", "return_url": "https://console.example/d"},
        ).json()
        assert onboarding["onboarding_url"].startswith("https://connect.stripe.com/")
        statement.refresh_from_db()
        assert statement.payout_status in ("failed", "paid")  # paid if the webhook came first
        time.sleep(2)
        statement_payout.apply(args=[statement.pk])  # the retry
        statement_payout.apply(args=[statement.pk])  # and once more
        wait_for(
            lambda: PublisherStatement.objects.get(pk=statement.pk).payout_status == "paid",
            "Stripe's transfer.created webhook",
        )

    statement.refresh_from_db()
    account = acme.publisher.stripe_account_id
    transfers = httpx.get(
        f"{localstripe}/v1/transfers", headers={"Authorization": "Bearer sk_test_x"}
    ).json()["data"]
    assert [(t["id"], t["destination"], t["amount"]) for t in transfers] == [
        (statement.stripe_transfer_id, account, int(statement.total * 100))
    ]
    assert statement.paid_at is not None
