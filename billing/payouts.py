"""Payouts to publishers through Stripe Connect.

A publisher links a connected account (an Express account the platform makes for it, which
its people then onboard at Stripe through an account link; or an account id an operator
gives). A final statement with money due is paid by one Stripe transfer to that account, made
by the task `statement_payout` after the statement commits: its idempotency key derives from
the statement (`sirocco-statement-<uid>-transfer`), so a retry after a timeout, a killed
worker or a lost answer gets Stripe's first transfer back, never a second one; the transfer's
id is saved only where none is yet. A failure is recorded with a back-off and retried by the
beat task. Stripe's webhook then confirms the transfer (`transfer.created`: paid into the
connected account) or reports its reversal (`transfer.reversed`), once per event.
"""

import logging
from datetime import timedelta

import stripe
from django.db import transaction
from django.utils import timezone

from accounts.actors import Actor
from accounts.roles import Permission
from accounts.services import audit_record, require
from billing.models import PublisherStatement
from billing.money import to_minor_units
from billing.periods import Period
from billing.stripe_sync import stripe_client, stripe_enabled
from catalog.models import Publisher
from catalog.permissions import is_operator
from catalog.publishers import require_publisher_member
from controlplane.errors import Conflict, Unavailable, ValidationFailed

logger = logging.getLogger(__name__)

_FIRST_BACKOFF = timedelta(minutes=1)
_MAX_BACKOFF = timedelta(hours=6)


def _require_manager(actor: Actor, publisher: Publisher) -> None:
    """Operators, or the publisher's people who manage its billing."""
    require_publisher_member(actor, publisher)
    if not is_operator(actor):
        require(actor, Permission.BILLING_WRITE)


def publisher_connect_account(
    *, actor: Actor, publisher: Publisher, refresh_url: str, return_url: str
) -> str:
    """Make (once) the publisher's Express account at Stripe and return a fresh onboarding
    link for it: the publisher's people finish the account there."""
    _require_manager(actor, publisher)
    if not stripe_enabled():
        raise Unavailable(
            "Stripe is not configured (STRIPE_API_KEY): payouts are off.",
            code="stripe_off",
            retry_after=3600,
        )
    client = stripe_client()
    try:
        if not publisher.stripe_account_id:
            account = client.v1.accounts.create(
                params={
                    "type": "express",
                    "email": publisher.organization.billing_email or None,
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {
                        "sirocco_publisher_id": str(publisher.pk),
                        "sirocco_organization": publisher.organization.slug,
                    },
                },
                options={"idempotency_key": f"sirocco-publisher-{publisher.uid}-account"},
            )
            _link(actor, publisher, account.id)
        link = client.v1.account_links.create(
            params={
                "account": publisher.stripe_account_id,
                "refresh_url": refresh_url,
                "return_url": return_url,
                "type": "account_onboarding",
            }
        )
    except stripe.StripeError as error:
        raise Unavailable(
            f"Stripe could not make the account now: {error.user_message or type(error).__name__}.",
            code="stripe_unavailable",
            retry_after=60,
        ) from None
    return link.url


def publisher_account_link(*, actor: Actor, publisher: Publisher, account_id: str) -> Publisher:
    """Pay the publisher into an existing connected account (operators): checked at Stripe."""
    from catalog.permissions import require_operator

    require_operator(actor)
    if not account_id.startswith("acct_"):
        raise ValidationFailed("A Stripe account id starts with acct_.", field="account_id")
    if stripe_enabled():
        try:
            stripe_client().v1.accounts.retrieve(account_id)
        except stripe.InvalidRequestError:
            raise ValidationFailed(
                f"Stripe has no account {account_id}.", field="account_id"
            ) from None
    _link(actor, publisher, account_id)
    return publisher


@transaction.atomic
def _link(actor: Actor, publisher: Publisher, account_id: str) -> None:
    locked = Publisher.objects.select_for_update().get(pk=publisher.pk)
    unconfirmed = PublisherStatement.objects.filter(
        publisher=publisher, payout_status=PublisherStatement.PayoutStatus.TRANSFERRED
    )
    if locked.stripe_account_id not in ("", account_id) and unconfirmed.exists():
        raise Conflict("A transfer to the current account is not confirmed yet.")
    old = locked.stripe_account_id
    locked.stripe_account_id = account_id
    locked.save(update_fields=["stripe_account_id"])
    publisher.stripe_account_id = account_id
    audit_record(
        actor=actor,
        action="publisher.payout_account.link",
        target=publisher,
        organization=publisher.organization,
        changes={"stripe_account_id": [old, account_id]},
    )
    # Statements that waited for an account are paid now.
    waiting = list(
        PublisherStatement.objects.filter(
            publisher=publisher, payout_status=PublisherStatement.PayoutStatus.PENDING
        ).values_list("pk", flat=True)
    )
    if waiting:
        from billing.tasks import statement_payout

        transaction.on_commit(lambda: [statement_payout.delay(pk) for pk in waiting])


def statement_payout(*, statement_id: int) -> PublisherStatement | None:
    """Transfer a final statement's total to its publisher's connected account, once.
    Returns the statement (its payout_status says how it went), or None if it is gone."""
    statement = (
        PublisherStatement.objects.select_related("publisher__organization")
        .filter(pk=statement_id)
        .first()
    )
    if statement is None or statement.payout_status not in (
        PublisherStatement.PayoutStatus.PENDING,
        PublisherStatement.PayoutStatus.FAILED,
    ):
        return statement
    account = statement.publisher.stripe_account_id
    if not stripe_enabled() or not account or statement.total <= 0:
        return statement  # waits for Stripe or the publisher's account (linking queues it)
    period = Period(statement.period_start, statement.period_end)
    try:
        transfer = stripe_client().v1.transfers.create(
            params={
                "amount": to_minor_units(statement.total, statement.currency),
                "currency": statement.currency.lower(),
                "destination": account,
                "description": f"Sirocco publisher statement {statement.number}, {period.label}",
                "transfer_group": statement.number,
                "metadata": {
                    "sirocco_statement_id": str(statement.pk),
                    "sirocco_statement_number": statement.number,
                },
            },
            options={"idempotency_key": f"sirocco-statement-{statement.uid}-transfer"},
        )
    except stripe.StripeError as error:
        attempts = statement.payout_attempts + 1
        PublisherStatement.objects.filter(pk=statement.pk).update(
            payout_status=PublisherStatement.PayoutStatus.FAILED,
            payout_attempts=attempts,
            payout_last_error=f"{type(error).__name__}: {error}"[:2000],
            payout_next_attempt_at=timezone.now()
            + min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (attempts - 1)),
        )
        logger.warning("payout of statement %s failed (attempt %s): %s", statement, attempts, error)
    else:
        recorded = PublisherStatement.objects.filter(
            pk=statement.pk,
            stripe_transfer_id="",
            payout_status__in=(
                PublisherStatement.PayoutStatus.PENDING,
                PublisherStatement.PayoutStatus.FAILED,
            ),
        ).update(
            stripe_transfer_id=transfer.id,
            payout_status=PublisherStatement.PayoutStatus.TRANSFERRED,
            payout_last_error="",
            payout_next_attempt_at=None,
        )
        if recorded:
            audit_record(
                actor=Actor.system(statement.publisher.organization),
                action="publisher.statement.transfer",
                target=statement,
                changes={"stripe_transfer_id": transfer.id, "amount": str(statement.total)},
            )
    statement.refresh_from_db()
    return statement


def statements_payout_due(*, now=None):
    """Statements whose payout waits or whose back-off has passed."""
    now = now or timezone.now()
    return PublisherStatement.objects.filter(
        payout_status__in=(
            PublisherStatement.PayoutStatus.PENDING,
            PublisherStatement.PayoutStatus.FAILED,
        ),
        publisher__stripe_account_id__gt="",
    ).exclude(payout_next_attempt_at__gt=now)


def transfer_event_apply(*, event_type: str, data_object: dict) -> PublisherStatement | None:
    """A transfer webhook (inside stripe_event_handle's transaction, once per event id):
    `transfer.created` confirms the statement paid, `transfer.reversed` marks it reversed."""
    metadata = data_object.get("metadata") or {}
    statement = (
        PublisherStatement.objects.select_for_update()
        .filter(stripe_transfer_id=data_object.get("id") or "-")
        .first()
    )
    if statement is None and str(metadata.get("sirocco_statement_id", "")).isdigit():
        statement = (
            PublisherStatement.objects.select_for_update()
            .filter(pk=int(metadata["sirocco_statement_id"]))
            .first()
        )
    if statement is None:
        return None
    old = statement.payout_status
    if not statement.stripe_transfer_id and data_object.get("id"):
        # The webhook came before the task saved the answer (it was lost): same transfer.
        statement.stripe_transfer_id = data_object["id"]
    if event_type == "transfer.created" and old != PublisherStatement.PayoutStatus.REVERSED:
        statement.payout_status = PublisherStatement.PayoutStatus.PAID
        statement.paid_at = statement.paid_at or timezone.now()
    elif event_type == "transfer.reversed":
        statement.payout_status = PublisherStatement.PayoutStatus.REVERSED
    statement.save(update_fields=["stripe_transfer_id", "payout_status", "paid_at"])
    if statement.payout_status != old:
        audit_record(
            actor=Actor.system(statement.publisher.organization),
            action="publisher.statement.payout_status",
            target=statement,
            changes={"payout_status": [old, statement.payout_status], "stripe": event_type},
        )
    return statement
