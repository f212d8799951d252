"""Stripe, optional (STRIPE_API_KEY empty = off): customers, invoices, payment webhooks (and the
transfer webhooks of publishers' payouts, applied by billing.payouts).

Finalization never waits on Stripe: it commits locally, then a Celery task pushes the invoice:
a customer per organization, a draft Stripe invoice, one invoice item per line (tax and
credits included, so Stripe's total is exactly ours), then finalization. Every call carries an
idempotency key derived from our ids, and every step's result is saved before the next, so a
retry (after a timeout, an outage or a killed worker) continues where it stopped and never
duplicates. A failed attempt is recorded with a back-off; the beat task retries it later.
"""

import logging
from datetime import timedelta

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.actors import Actor
from accounts.services import audit_record
from billing.models import BillingAccount, Invoice, StripeEvent, StripeInvoiceItem
from billing.money import to_minor_units
from billing.periods import Period

logger = logging.getLogger(__name__)

# Back-off between attempts: 1 min, 2, 4, ... capped at 6 hours.
_FIRST_BACKOFF = timedelta(minutes=1)
_MAX_BACKOFF = timedelta(hours=6)


def stripe_enabled() -> bool:
    return bool(settings.STRIPE_API_KEY)


def stripe_client() -> stripe.StripeClient:
    return stripe.StripeClient(
        settings.STRIPE_API_KEY,
        base_addresses={"api": settings.STRIPE_API_BASE or "https://api.stripe.com"},
        # Our own retries (with back-off, across worker restarts) replace the library's.
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_SECONDS),
    )


def _customer_id(client: stripe.StripeClient, organization) -> str:
    account, _ = BillingAccount.objects.get_or_create(organization=organization)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    customer = client.v1.customers.create(
        params={
            "name": organization.name,
            "email": organization.billing_email or None,
            "metadata": {
                "sirocco_organization_id": str(organization.pk),
                "sirocco_organization": organization.slug,
            },
        },
        options={"idempotency_key": f"sirocco-customer-{account.uid}"},
    )
    BillingAccount.objects.filter(pk=account.pk, stripe_customer_id="").update(
        stripe_customer_id=customer.id
    )
    account.refresh_from_db()
    return account.stripe_customer_id


def invoice_stripe_sync(*, invoice_id: int) -> Invoice | None:
    """Push one finalized invoice to Stripe, resuming after whatever step last succeeded.
    Returns the invoice (its stripe_status says how it went), or None when it is gone."""
    invoice = Invoice.objects.select_related("organization").filter(pk=invoice_id).first()
    if invoice is None or invoice.stripe_status in (
        Invoice.StripeStatus.SYNCED,
        Invoice.StripeStatus.DISABLED,
    ):
        return invoice
    if not stripe_enabled():
        return invoice  # stays pending until Stripe is configured
    client = stripe_client()
    try:
        _push(client, invoice)
    except stripe.StripeError as exc:
        attempts = invoice.stripe_attempts + 1
        backoff = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (attempts - 1))
        Invoice.objects.filter(pk=invoice.pk).update(
            stripe_status=Invoice.StripeStatus.FAILED,
            stripe_attempts=attempts,
            stripe_last_error=f"{type(exc).__name__}: {exc}"[:2000],
            stripe_next_attempt_at=timezone.now() + backoff,
        )
        logger.warning("Stripe sync of invoice %s failed (attempt %s): %s", invoice, attempts, exc)
    invoice.refresh_from_db()
    return invoice


def _push(client: stripe.StripeClient, invoice: Invoice) -> None:
    customer = _customer_id(client, invoice.organization)
    currency = invoice.currency.lower()
    key = f"sirocco-invoice-{invoice.uid}"
    if not invoice.stripe_invoice_id:
        period = Period(invoice.period_start, invoice.period_end)
        remote = client.v1.invoices.create(
            params={
                "customer": customer,
                "currency": currency,
                "auto_advance": False,
                "collection_method": "charge_automatically",
                "pending_invoice_items_behavior": "exclude",
                "description": f"Sirocco invoice {invoice.number}, period {period.label}",
                "metadata": {
                    "sirocco_invoice_id": str(invoice.pk),
                    "sirocco_invoice_number": invoice.number,
                },
            },
            options={"idempotency_key": f"{key}-create"},
        )
        Invoice.objects.filter(pk=invoice.pk, stripe_invoice_id="").update(
            stripe_invoice_id=remote.id
        )
        invoice.refresh_from_db()
    remote = client.v1.invoices.retrieve(invoice.stripe_invoice_id)
    if remote.status == "draft":
        # Lines already on the Stripe invoice (an item made just before a crash) are not made
        # again, even past the 24 hours Stripe keeps idempotency keys.
        present = {
            (line.to_dict().get("metadata") or {}).get("sirocco_line")
            for line in client.v1.invoices.line_items.list(
                invoice.stripe_invoice_id, params={"limit": 100}
            ).auto_paging_iter()
        }
        for line in invoice.lines.exclude(amount=0).filter(stripe_item__isnull=True):
            line_key = f"{invoice.pk}-{line.position}"
            if line_key in present:
                continue
            item = client.v1.invoice_items.create(
                params={
                    "customer": customer,
                    "invoice": invoice.stripe_invoice_id,
                    "amount": to_minor_units(line.amount, invoice.currency),
                    "currency": currency,
                    "description": line.description,
                    "metadata": {"sirocco_line": line_key, "sirocco_kind": line.kind},
                },
                options={"idempotency_key": f"{key}-line-{line.position}"},
            )
            # ignore_conflicts: a concurrent sync may have recorded the same item first.
            StripeInvoiceItem.objects.bulk_create(
                [StripeInvoiceItem(line=line, stripe_invoice_item_id=item.id)],
                ignore_conflicts=True,
            )
        # auto_advance from here on: Stripe collects the payment (and tells us by webhook).
        # It is off until now so that Stripe never finalizes a half-built draft by itself.
        remote = client.v1.invoices.finalize_invoice(
            invoice.stripe_invoice_id,
            params={"auto_advance": True},
            options={"idempotency_key": f"{key}-finalize"},
        )
    Invoice.objects.filter(pk=invoice.pk).update(
        stripe_status=Invoice.StripeStatus.SYNCED,
        stripe_amount_due=remote.amount_due,
        stripe_synced_at=timezone.now(),
        stripe_last_error="",
        stripe_next_attempt_at=None,
    )


def invoices_stripe_due(*, now=None):
    """Invoices whose sync should be (re)tried now."""
    now = now or timezone.now()
    return (
        Invoice.objects.filter(
            stripe_status__in=[Invoice.StripeStatus.PENDING, Invoice.StripeStatus.FAILED]
        )
        .exclude(stripe_next_attempt_at__gt=now)
        .order_by("id")
    )


def stripe_amount_due(*, invoice: Invoice) -> int | None:
    """What Stripe says the invoice asks for, fetched now (the reconciler's third column)."""
    if not (stripe_enabled() and invoice.stripe_invoice_id):
        return None
    return stripe_client().v1.invoices.retrieve(invoice.stripe_invoice_id).amount_due


# --- Webhooks --------------------------------------------------------------------------------


@transaction.atomic
def stripe_event_handle(*, event_id: str, event_type: str, data_object: dict) -> bool:
    """Apply a verified webhook event once. Returns False for a redelivery (already handled)."""
    invoice = None
    if event_type.startswith("invoice."):
        metadata = data_object.get("metadata") or {}
        invoice = (
            Invoice.objects.select_for_update()
            .filter(stripe_invoice_id=data_object.get("id") or "-")
            .first()
        )
        if invoice is None and str(metadata.get("sirocco_invoice_id", "")).isdigit():
            invoice = (
                Invoice.objects.select_for_update()
                .filter(pk=int(metadata["sirocco_invoice_id"]))
                .first()
            )
    try:
        with transaction.atomic():
            StripeEvent.objects.create(event_id=event_id, type=event_type, invoice=invoice)
    except IntegrityError:
        return False
    if event_type.startswith("transfer."):  # a payout to a publisher (billing.payouts)
        from billing.payouts import transfer_event_apply

        transfer_event_apply(event_type=event_type, data_object=data_object)
        return True
    if invoice is None:
        return True
    old_status = invoice.payment_status
    if event_type == "invoice.paid" and invoice.payment_status != Invoice.PaymentStatus.PAID:
        invoice.payment_status = Invoice.PaymentStatus.PAID
        invoice.paid_at = timezone.now()
        invoice.save(update_fields=["payment_status", "paid_at"])
    elif (
        event_type == "invoice.payment_failed"
        and invoice.payment_status == Invoice.PaymentStatus.UNPAID
    ):
        invoice.payment_status = Invoice.PaymentStatus.PAYMENT_FAILED
        invoice.save(update_fields=["payment_status"])
    elif event_type == "invoice.payment_failed":
        logger.info(
            "ignored invoice.payment_failed for %s: it is %s", invoice, invoice.payment_status
        )
    if invoice.payment_status != old_status:
        audit_record(
            actor=Actor.system(invoice.organization),
            action="invoice.payment_status",
            target=invoice,
            changes={"payment_status": [old_status, invoice.payment_status], "stripe": event_id},
        )
    return True
