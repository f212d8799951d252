"""Reads of billing, shared by the REST API, the console, the gateway and the reconciler."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from accounts.models import Organization, Project
from billing.models import (
    BudgetAlert,
    CreditGrant,
    Invoice,
    PeriodSpend,
    ProjectBudgetAlert,
    ProjectPeriodSpend,
)
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


def project_spend_position(*, project_id: int, now: datetime | None = None) -> SpendPosition | None:
    """A project's period spend (ingested, plus its not-yet-ingested events) against its
    monthly budget, in its organization's currency; None if the project is gone. The same
    reading order and the same overshoot bound as the organization's (gateway/budget.py)."""
    now = now or timezone.now()
    period = period_containing(now)
    project = (
        Project.objects.filter(pk=project_id)
        .values("monthly_budget", "organization_id", "organization__currency")
        .first()
    )
    if project is None:
        return None
    limit, currency = project["monthly_budget"], project["organization__currency"]
    pending = Decimal(0)
    if limit is not None:
        pending = _pending_usage_cost(
            project["organization_id"], currency=currency, now=now, project_id=project_id
        )
    spend = (
        ProjectPeriodSpend.objects.filter(project_id=project_id, period_start=period.start)
        .values_list("amount", flat=True)
        .first()
    )
    return SpendPosition(limit, (spend or Decimal(0)) + pending, currency, period.start)


def project_period_spend(*, project: Project, now: datetime | None = None) -> Decimal:
    period = period_containing(now or timezone.now())
    amount = (
        ProjectPeriodSpend.objects.filter(project=project, period_start=period.start)
        .values_list("amount", flat=True)
        .first()
    )
    return amount or Decimal(0)


@dataclass(frozen=True)
class ProjectBudget:
    """A project's budget this period, as the console and GET projects/{id}/budget show it."""

    project: Project
    currency: str
    monthly_budget: Decimal | None
    spend: Decimal
    percent: Decimal | None
    alerts: list


def project_budget(*, project: Project, now: datetime | None = None) -> ProjectBudget:
    from billing.budgets import spend_percent

    spend = project_period_spend(project=project, now=now)
    return ProjectBudget(
        project=project,
        currency=project.organization.currency,
        monthly_budget=project.monthly_budget,
        spend=spend,
        percent=spend_percent(spend, project.monthly_budget),
        alerts=list(project_budget_alerts_current(project=project, now=now)),
    )


def project_budget_alerts_current(
    *, project: Project, now: datetime | None = None
) -> QuerySet[ProjectBudgetAlert]:
    period = period_containing(now or timezone.now())
    return ProjectBudgetAlert.objects.filter(project=project, period_start=period.start)


def _pending_usage_cost(
    organization_id: int, *, currency: str, now: datetime, project_id: int | None = None
) -> Decimal:
    # Few rows while ingestion keeps up (it runs every few seconds): the partial index on
    # un-ingested events. Rated at the price in force now, as the events will be.
    events = UsageEvent.objects.filter(ingested_at__isnull=True, organization_id=organization_id)
    if project_id is not None:
        events = events.filter(project_id=project_id)
    totals = (
        events.values("model_version_id")
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
