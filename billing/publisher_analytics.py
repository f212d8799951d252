"""What a publisher sees of its models' use: per model and day, requests, tokens, GPU time, the
revenue rated in the ledger (before invoice rounding: the statements carry the invoiced
figures) and how many customer organizations used it — aggregated, never naming a customer
unless that customer accepted terms of the model that say the publisher may know it
(`TermsOfUse.customers_named`). Read from the rollups and the dedicated ledger: one query
each."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal

from django.db.models import Sum

from billing.models import DedicatedUsageRecord, UsageRollup
from billing.rating import rate_gpu_seconds, rate_tokens
from catalog.models import ModelVersion, Publisher, TermsAcceptance


@dataclass
class UsageFigures:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    gpu_seconds: int = 0
    revenue: Decimal = Decimal(0)

    def add(self, other: UsageFigures) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.gpu_seconds += other.gpu_seconds
        self.revenue += other.revenue


@dataclass
class ModelAnalytics:
    model: str
    days: dict[date, UsageFigures] = field(default_factory=dict)
    total: UsageFigures = field(default_factory=UsageFigures)
    customers: int = 0


@dataclass
class PublisherAnalytics:
    start: date
    end: date
    currency: str
    models: list[ModelAnalytics]
    customers: int
    # (slug, figures) of the customers who agreed to be named, largest revenue first.
    named: list[tuple[str, UsageFigures]]

    @property
    def day_list(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]


def publisher_analytics(*, publisher: Publisher, start: date, end: date) -> PublisherAnalytics:
    """The publisher's models' use from `start` to `end` (UTC days, inclusive), in the currency
    most of it was rated in (other currencies are left out of revenue, not converted)."""
    versions = dict(
        ModelVersion.objects.filter(model__listing__publisher=publisher).values_list(
            "pk", "model__slug"
        )
    )
    per_model: dict[str, ModelAnalytics] = {}
    customers_by_model = defaultdict(set)
    by_customer = defaultdict(UsageFigures)
    currencies = defaultdict(int)
    rows = list(
        UsageRollup.objects.filter(
            model_version_id__in=list(versions), day__gte=start, day__lte=end
        )
        .values(
            "day",
            "model_version_id",
            "organization_id",
            "currency",
            "input_price_per_million",
            "output_price_per_million",
            "cached_input_price_per_million",
        )
        .annotate(
            requests=Sum("requests"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cached_tokens=Sum("cached_tokens"),
        )
        .order_by()
    )
    dedicated = list(
        DedicatedUsageRecord.objects.filter(
            model_version_id__in=list(versions),
            start__date__gte=start,
            start__date__lte=end,
        ).values(
            "start", "model_version_id", "organization_id", "currency", "gpu_count", "seconds",
            "price_per_hour",
        )
    )  # fmt: skip
    for row in rows:
        currencies[row["currency"]] += row["input_tokens"] + row["output_tokens"]
    for row in dedicated:
        currencies[row["currency"]] += row["seconds"]
    currency = max(currencies, key=currencies.get) if currencies else "USD"

    def figures_for(slug: str, day: date, organization_id: int) -> list[UsageFigures]:
        model = per_model.setdefault(slug, ModelAnalytics(model=slug))
        customers_by_model[slug].add(organization_id)
        return [
            model.days.setdefault(day, UsageFigures()),
            model.total,
            by_customer[organization_id],
        ]

    for row in rows:
        revenue = Decimal(0)
        if row["currency"] == currency:
            revenue = rate_tokens(
                input_tokens=row["input_tokens"],
                output_tokens=row["output_tokens"],
                input_per_million=row["input_price_per_million"],
                output_per_million=row["output_price_per_million"],
                cached_tokens=row["cached_tokens"],
                cached_input_per_million=row["cached_input_price_per_million"],
            )
        figures = UsageFigures(
            requests=row["requests"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            revenue=revenue,
        )
        for target in figures_for(
            versions[row["model_version_id"]], row["day"], row["organization_id"]
        ):
            target.add(figures)
    for row in dedicated:
        revenue = Decimal(0)
        if row["currency"] == currency:
            revenue = rate_gpu_seconds(seconds=row["seconds"], per_hour=row["price_per_hour"])
        figures = UsageFigures(gpu_seconds=row["seconds"] * row["gpu_count"], revenue=revenue)
        day = row["start"].date()
        for target in figures_for(versions[row["model_version_id"]], day, row["organization_id"]):
            target.add(figures)
    for slug, model in per_model.items():
        model.customers = len(customers_by_model[slug])
    consenting = set(
        TermsAcceptance.objects.filter(
            terms__model_version__model__listing__publisher=publisher,
            terms__customers_named=True,
            organization_id__in=list(by_customer),
        ).values_list("organization_id", "organization__slug")
    )
    named = sorted(
        ((slug, by_customer[org]) for org, slug in consenting),
        key=lambda item: (-item[1].revenue, item[0]),
    )
    return PublisherAnalytics(
        start=start,
        end=end,
        currency=currency,
        models=sorted(per_model.values(), key=lambda m: m.model),
        customers=len(by_customer),
        named=named,
    )
