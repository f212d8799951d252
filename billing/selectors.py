"""Reads of billing, shared by the REST API, the console, the gateway and the reconciler."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from accounts.models import Organization
from billing.models import BudgetAlert, CreditGrant, Invoice, PeriodSpend
from billing.periods import period_containing
from billing.rating import rate_tokens
from catalog.models import TokenPrice
from metering.models import UsageEvent


@dataclass(frozen=True)
class SpendPosition:
    """An organization's spend in the period containing `now`, against its hard limit."""

    limit: Decimal | None  # None: no limit
    spend: Decimal
    currency: str
    period_start: datetime


def organization_spend_position(
    *, organization_id: int, now: datetime | None = None
) -> SpendPosition | None:
    """The organization's period spend (the running total ingestion keeps, plus what its
    not-yet-ingested usage events cost at today's prices) and its limit; None if it is gone.

    The gateway holds worst-case costs against the limit from this figure (gateway/budget.py):
    the events are read before the total, so an event ingested between the two reads is
    counted twice (never missed). A limit of 0 blocks all paid usage.
    """
    now = now or timezone.now()
    period = period_containing(now)
    organization = (
        Organization.objects.filter(pk=organization_id)
        .values("monthly_spend_limit", "currency")
        .first()
    )
    if organization is None:
        return None
    limit, currency = organization["monthly_spend_limit"], organization["currency"]
    pending = Decimal(0)
    if limit is not None:
        pending = _pending_usage_cost(organization_id, currency=currency, now=now)
    spend = (
        PeriodSpend.objects.filter(organization_id=organization_id, period_start=period.start)
        .values_list("amount", flat=True)
        .first()
    )
    return SpendPosition(limit, (spend or Decimal(0)) + pending, currency, period.start)


def _pending_usage_cost(organization_id: int, *, currency: str, now: datetime) -> Decimal:
    # Few rows while ingestion keeps up (it runs every few seconds): the partial index on
    # un-ingested events. Rated at the price in force now, as the events will be.
    totals = (
        UsageEvent.objects.filter(ingested_at__isnull=True, organization_id=organization_id)
        .values("model_version_id")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        .order_by()
    )
    cost = Decimal(0)
    for row in totals:
        if row["model_version_id"] is None:
            continue
        price = (
            TokenPrice.objects.filter(
                model_version_id=row["model_version_id"], effective_from__lte=now
            )
            .order_by("-effective_from", "-id")
            .first()
        )
        if price is None or price.currency != currency:
            continue  # rated at zero by ingestion too
        cost += rate_tokens(
            input_tokens=row["prompt"] or 0,
            output_tokens=row["completion"] or 0,
            input_per_million=price.input_per_million,
            output_per_million=price.output_per_million,
        )
    return cost


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
