"""Billing's writes that people make: credit notes and credit grants. Like every other write of
the platform they take an `Actor` (an operator in the admin, a management command, the system)
and leave an audit row in the organization's log, so a customer's auditors see who credited
what and why. (Writes the platform makes on its own, closing periods and applying Stripe's
payment events, audit as the system: `invoicing.invoices_finalize`, `stripe_sync`.)
"""

from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.actors import Actor
from accounts.services import audit_record
from billing.invoicing import next_document_number
from billing.models import CreditGrant, CreditNote, Invoice
from billing.money import round_money
from controlplane.errors import ValidationFailed


@transaction.atomic
def credit_note_create(
    *, actor: Actor, invoice: Invoice, amount: Decimal, reason: str
) -> CreditNote:
    """Correct a finalized invoice by crediting part or all of what it charged."""
    invoice = Invoice.objects.select_for_update().select_related("organization").get(pk=invoice.pk)
    if round_money(amount, invoice.currency) != amount or amount <= 0:
        raise ValidationFailed(
            f"The amount must be positive and in whole {invoice.currency} minor units.",
            field="amount",
        )
    credited = invoice.credit_notes.aggregate(total=Sum("amount"))["total"] or Decimal(0)
    charged = invoice.subtotal + invoice.tax
    if credited + amount > charged:
        raise ValidationFailed(
            f"Invoice {invoice.number} charged {charged} {invoice.currency} and has "
            f"{credited} credited already; at most {charged - credited} can be credited.",
            field="amount",
        )
    if not reason.strip():
        raise ValidationFailed("Say why the invoice is corrected.", field="reason")
    note = CreditNote.objects.create(
        invoice=invoice,
        number=next_document_number("credit-note", timezone.now().year),
        amount=amount,
        reason=reason.strip(),
        created_by=actor.label,
    )
    audit_record(
        actor=actor,
        action="credit_note.create",
        target=note,
        organization=invoice.organization,
        changes={
            "invoice": invoice.number,
            "amount": str(amount),
            "currency": invoice.currency,
            "reason": note.reason,
        },
    )
    return note


@transaction.atomic
def credit_grant_create(
    *,
    actor: Actor,
    organization,
    amount: Decimal,
    description: str,
    expires_at: datetime | None = None,
) -> CreditGrant:
    """Give an organization prepaid credit in its currency; the next invoices draw on it."""
    currency = organization.currency
    if amount <= 0 or round_money(amount, currency) != amount:
        raise ValidationFailed(
            f"The amount must be positive and in whole {currency} minor units.", field="amount"
        )
    grant = CreditGrant.objects.create(
        organization=organization,
        currency=currency,
        amount=amount,
        remaining=amount,
        description=description,
        created_by=actor.label,
        expires_at=expires_at,
    )
    audit_record(
        actor=actor,
        action="credit_grant.create",
        target=grant,
        organization=organization,
        changes={
            "amount": str(amount),
            "currency": currency,
            "description": description,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return grant
