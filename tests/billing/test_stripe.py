"""Stripe against the localstripe stand-in on loopback, and webhook signatures."""

import hashlib
import hmac
import json
import time
from decimal import Decimal

import httpx
import pytest
from django.test import override_settings

from accounts.actors import Actor
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import Invoice, StripeEvent
from billing.services import credit_grant_create
from billing.stripe_sync import invoice_stripe_sync, invoices_stripe_due
from tests.billing.conftest import NOW, WEBHOOK_SECRET, at, free_port
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory

pytestmark = [pytest.mark.django_db]


def remote(base, path, **params):
    response = httpx.get(
        f"{base}{path}", params=params, headers={"Authorization": "Bearer sk_test_x"}
    )
    response.raise_for_status()
    return response.json()


def closed_invoice(organization, *, credits=None) -> Invoice:
    version = ModelVersionFactory()
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=at(2026, 1, 1),
    )
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        prompt_tokens=3_000_000,
        completion_tokens=1_000_001,
        finished_at=at(2026, 2, 5),
    )
    usage_events_ingest(now=NOW)
    if credits:
        credit_grant_create(
            actor=Actor.system(organization),
            organization=organization,
            amount=credits,
            description="promo",
        )
    [invoice] = billing_period_close(period_start=at(2026, 2, 1), now=NOW).created
    return invoice


@pytest.mark.slow  # starts the localstripe server
@override_settings(BILLING_TAX_RATE="0.1")
def test_a_finalized_invoice_becomes_one_finalized_stripe_invoice(
    organization, stripe_on, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):  # the sync task runs on commit
        invoice = closed_invoice(organization, credits=Decimal("1.00"))
    invoice.refresh_from_db()
    assert invoice.stripe_status == Invoice.StripeStatus.SYNCED, invoice.stripe_last_error
    # 1.50 + 1.50 (1.5000015) = 3.00; tax 0.30; credits -1.00
    assert invoice.total == Decimal("2.30")
    assert invoice.stripe_amount_due == 230
    stripe_invoice = remote(stripe_on, f"/v1/invoices/{invoice.stripe_invoice_id}")
    assert stripe_invoice["status"] == "open"
    assert stripe_invoice["metadata"]["sirocco_invoice_number"] == invoice.number
    assert [line["amount"] for line in stripe_invoice["lines"]["data"]] == [150, 150, 30, -100]
    customer = organization.billing_account.stripe_customer_id
    assert remote(stripe_on, f"/v1/customers/{customer}")["metadata"][
        "sirocco_organization_id"
    ] == str(organization.pk)
    # Syncing again is a no-op.
    invoice_stripe_sync(invoice_id=invoice.pk)
    assert len(remote(stripe_on, "/v1/invoices", customer=customer)["data"]) == 1


@pytest.mark.slow  # starts the localstripe server
def test_stripe_down_finalization_completes_and_the_retry_does_not_duplicate(
    organization, stripe_on, django_capture_on_commit_callbacks
):
    with (
        override_settings(STRIPE_API_BASE=f"http://127.0.0.1:{free_port()}"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        invoice = closed_invoice(organization)
    invoice.refresh_from_db()
    assert invoice.number  # finalized locally all the same
    assert invoice.stripe_status == Invoice.StripeStatus.FAILED
    assert invoice.stripe_attempts == 1
    assert "APIConnectionError" in invoice.stripe_last_error
    assert invoice.stripe_next_attempt_at > NOW
    assert list(invoices_stripe_due(now=invoice.stripe_next_attempt_at)) == [invoice]

    invoice = invoice_stripe_sync(invoice_id=invoice.pk)  # Stripe is back
    assert invoice.stripe_status == Invoice.StripeStatus.SYNCED
    customer = organization.billing_account.stripe_customer_id
    [stripe_invoice] = remote(stripe_on, "/v1/invoices", customer=customer)["data"]
    assert stripe_invoice["amount_due"] == 300


@pytest.mark.slow  # starts the localstripe server
def test_stripe_slow_the_timed_out_calls_are_not_repeated(
    organization, stripe_on, django_capture_on_commit_callbacks
):
    invoice = closed_invoice(organization)  # on_commit not run: the sync has not started
    # Stripe makes the first invoice item, then answers too late: our call times out.
    httpx.post(
        f"{stripe_on}/_config/delay",
        json={"path": "/v1/invoiceitems", "seconds": 2, "count": 1},
    )
    invoice = invoice_stripe_sync(invoice_id=invoice.pk)
    assert invoice.stripe_status == Invoice.StripeStatus.FAILED
    assert "Timeout" in invoice.stripe_last_error or "timed out" in invoice.stripe_last_error
    time.sleep(2)
    invoice = invoice_stripe_sync(invoice_id=invoice.pk)
    assert invoice.stripe_status == Invoice.StripeStatus.SYNCED
    stripe_invoice = remote(stripe_on, f"/v1/invoices/{invoice.stripe_invoice_id}")
    assert [line["amount"] for line in stripe_invoice["lines"]["data"]] == [150, 150]
    assert stripe_invoice["amount_due"] == 300


def test_without_stripe_invoices_stay_local(organization, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        invoice = closed_invoice(organization)
    assert invoice.stripe_status == Invoice.StripeStatus.DISABLED
    assert not invoices_stripe_due().exists()


# --- Webhooks ------------------------------------------------------------------------------


def signed(payload: bytes, *, secret=WEBHOOK_SECRET, timestamp=None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def event(event_type, stripe_invoice, event_id="evt_1") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "data": {"object": stripe_invoice},
        }
    ).encode()


def post(client, payload, signature):
    return client.post(
        "/api/v1/billing/stripe/webhook",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature,
    )


@pytest.mark.slow  # starts the localstripe server
def test_paid_and_failed_events_update_the_invoice_once(organization, stripe_on, client):
    invoice = invoice_stripe_sync(invoice_id=closed_invoice(organization).pk)
    stripe_invoice = remote(stripe_on, f"/v1/invoices/{invoice.stripe_invoice_id}")

    failed = event("invoice.payment_failed", stripe_invoice, "evt_failed")
    assert post(client, failed, signed(failed)).status_code == 200
    invoice.refresh_from_db()
    assert invoice.payment_status == Invoice.PaymentStatus.PAYMENT_FAILED

    paid = event("invoice.paid", stripe_invoice, "evt_paid")
    response = post(client, paid, signed(paid))
    assert response.json() == {"received": True, "duplicate": False}
    invoice.refresh_from_db()
    assert invoice.payment_status == Invoice.PaymentStatus.PAID
    paid_at = invoice.paid_at

    # Stripe redelivers both: nothing changes, and a late "failed" cannot undo "paid".
    assert post(client, paid, signed(paid)).json()["duplicate"] is True
    assert post(client, failed, signed(failed)).json()["duplicate"] is True
    invoice.refresh_from_db()
    assert (invoice.payment_status, invoice.paid_at) == (Invoice.PaymentStatus.PAID, paid_at)
    assert StripeEvent.objects.count() == 2
    from accounts.models import AuditLogEntry

    entries = AuditLogEntry.objects.filter(
        action="invoice.payment_status", organization=organization
    )
    assert sorted((e.changes["stripe"], tuple(e.changes["payment_status"])) for e in entries) == [
        ("evt_failed", ("unpaid", "payment_failed")),
        ("evt_paid", ("payment_failed", "paid")),
    ]


@pytest.mark.parametrize(
    "tamper",
    ["body", "secret", "stale", "missing", "garbage"],
)
def test_bad_signatures_are_refused(organization, client, tamper):
    payload = event("invoice.paid", {"id": "in_x", "object": "invoice"})
    signature = signed(payload)
    if tamper == "body":
        payload = payload.replace(b"in_x", b"in_y")
    elif tamper == "secret":
        signature = signed(payload, secret="whsec_other")
    elif tamper == "stale":
        signature = signed(payload, timestamp=int(time.time()) - 301)
    elif tamper == "missing":
        signature = ""
    elif tamper == "garbage":
        signature = "nonsense"
    with override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET):
        response = post(client, payload, signature)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert not StripeEvent.objects.exists()


def test_a_fresh_signature_within_tolerance_is_accepted(client):
    payload = event("customer.created", {"id": "cus_1", "object": "customer"})
    with override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET):
        response = post(client, payload, signed(payload, timestamp=int(time.time()) - 290))
    assert response.status_code == 200
    assert StripeEvent.objects.get().type == "customer.created"


def test_invalid_json_and_unconfigured_secret(client):
    with override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET):
        assert post(client, b"{not json", signed(b"{not json")).status_code == 400
    with override_settings(STRIPE_WEBHOOK_SECRET=""):
        assert post(client, b"{}", signed(b"{}")).status_code == 503
    assert client.get("/api/v1/billing/stripe/webhook").status_code == 405


@pytest.mark.slow  # starts the localstripe server
def test_reconcile_compares_with_stripe(organization, stripe_on):
    from io import StringIO

    from django.core.management import call_command

    invoice_stripe_sync(invoice_id=closed_invoice(organization).pk)
    out = StringIO()
    call_command("billing_reconcile", "--period", "2026-02", stdout=out)
    assert "agree" in out.getvalue()
    assert " 300" in out.getvalue()  # Stripe's amount due, in cents
