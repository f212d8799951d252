"""Reads of billing, shared by the REST API, the console, the gateway and the reconciler."""

from datetime import datetime
from decimal import Decimal

from django.db.models import F, OuterRef, QuerySet, Subquery
from django.utils import timezone

from accounts.models import Organization
from billing.models import BudgetAlert, CreditGrant, Invoice, PeriodSpend
from billing.periods import period_containing


def organization_spend_blocked(*, organization_id: int, now: datetime | None = None) -> bool:
    """Whether the organization's spend in the current period has reached its hard limit.

    One indexed query over the running total that ingestion keeps; the gateway caches the
    answer for a few seconds. A limit of 0 blocks all paid usage; no limit never blocks.
    """
    period = period_containing(now or timezone.now())
    row = (
        Organization.objects.filter(pk=organization_id)
        .annotate(
            spend=Subquery(
                PeriodSpend.objects.filter(
                    organization_id=OuterRef("pk"), period_start=period.start
                ).values("amount")[:1]
            )
        )
        .values("monthly_spend_limit", "spend")
        .first()
    )
    if row is None or row["monthly_spend_limit"] is None:
        return False
    return (row["spend"] or Decimal(0)) >= row["monthly_spend_limit"]


def period_spend(*, organization: Organization, now: datetime | None = None) -> Decimal:
    period = period_containing(now or timezone.now())
    amount = (
        PeriodSpend.objects.filter(organization=organization, period_start=period.start)
        .values_list("amount", flat=True)
        .first()
    )
    return amount or Decimal(0)


def budget_alerts_current(
    *, organization: Organization, now: datetime | None = None
) -> QuerySet[BudgetAlert]:
    """This period's alerts, highest threshold first: what the console's banner shows."""
    period = period_containing(now or timezone.now())
    return BudgetAlert.objects.filter(organization=organization, period_start=period.start)


def invoice_list(*, organization: Organization) -> QuerySet[Invoice]:
    """The organization's invoices, newest period first, with their credit notes."""
    return Invoice.objects.filter(organization=organization).prefetch_related("credit_notes")


def credit_grants_available(
    *, organization: Organization, currency: str, at: datetime
) -> QuerySet[CreditGrant]:
    """Grants an invoice may draw on, in the order it draws: soonest expiry first."""
    return (
        CreditGrant.objects.filter(organization=organization, currency=currency, remaining__gt=0)
        .exclude(expires_at__lte=at)
        .order_by(F("expires_at").asc(nulls_last=True), "created_at", "id")
    )
