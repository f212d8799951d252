"""Billing's Celery tasks (queue `billing`). Thin: ids in, a service call, idempotent. Each is
named as the service it calls (`usage_events_ingest` calls `ledger.usage_events_ingest`), so a
task in a log or in Flower leads straight to its code."""

import time

from celery import shared_task
from django.conf import settings

from billing import budgets, invoicing, ledger, payouts, stripe_sync

# Leave the worker to other tasks after this long; the next beat tick continues the backlog.
_INGEST_TIME_BUDGET_SECONDS = 50


@shared_task
def usage_events_ingest() -> int:
    """Ingest the gateway's usage backlog batch by batch (beat runs this every few seconds)."""
    taken, deadline = 0, time.monotonic() + _INGEST_TIME_BUDGET_SECONDS
    while time.monotonic() < deadline:
        count = ledger.usage_events_ingest()
        taken += count
        if count < settings.BILLING_INGEST_BATCH_SIZE:
            break
    return taken


@shared_task
def replica_usage_ingest() -> int:
    """Cut the deployments' replica intervals into dedicated ledger rows."""
    return ledger.replica_usage_ingest()


@shared_task
def billing_periods_close_due() -> int:
    """Finalize the invoices of every period that has ended (idempotent; beat runs it hourly)."""
    return sum(len(result.created) for result in invoicing.billing_periods_close_due())


@shared_task
def invoice_stripe_sync(invoice_id: int) -> str | None:
    invoice = stripe_sync.invoice_stripe_sync(invoice_id=invoice_id)
    return invoice.stripe_status if invoice else None


@shared_task
def invoices_stripe_sync_due() -> int:
    """Retry the Stripe sync of invoices whose back-off has passed (and any never tried)."""
    if not stripe_sync.stripe_enabled():
        return 0
    ids = list(stripe_sync.invoices_stripe_due().values_list("id", flat=True)[:500])
    for invoice_id in ids:
        invoice_stripe_sync.delay(invoice_id)
    return len(ids)


@shared_task
def budget_alert_email(alert_id: int) -> bool:
    return budgets.budget_alert_email(alert_id=alert_id)


@shared_task
def statement_payout(statement_id: int) -> str | None:
    """Transfer a publisher statement's total to its connected account (once: the idempotency
    key derives from the statement)."""
    statement = payouts.statement_payout(statement_id=statement_id)
    return statement.payout_status if statement else None


@shared_task
def statements_payout_due() -> int:
    """Retry payouts whose back-off has passed (and any that waited for an account)."""
    if not stripe_sync.stripe_enabled():
        return 0
    ids = list(payouts.statements_payout_due().values_list("id", flat=True)[:500])
    for statement_id in ids:
        statement_payout.delay(statement_id)
    return len(ids)


@shared_task
def project_budget_alert_email(alert_id: int) -> bool:
    return budgets.project_budget_alert_email(alert_id=alert_id)
