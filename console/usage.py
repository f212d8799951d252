"""Usage by day, model and deployment for the usage dashboard and its CSV export.

Reads billing's daily rollups (tokens) and dedicated ledger segments (GPU seconds) grouped in
SQL, and prices each group with billing's own rating functions (`billing.rating`), so the
dashboard's amounts are the ledger's: unrounded here, rounded only on invoice lines. Four
queries whatever the range: token groups, dedicated groups, and the names of both.
"""

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import DedicatedUsageRecord, UsageRollup
from billing.rating import rate_gpu_seconds, rate_tokens
from catalog.models import ModelVersion
from deployments.models import Deployment


@dataclass
class UsageRow:
    """One day × model × deployment."""

    day: date
    model: str
    deployment: str
    currency: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    token_cost: Decimal = Decimal(0)
    dedicated_seconds: int = 0
    dedicated_cost: Decimal = Decimal(0)

    @property
    def cost(self) -> Decimal:
        return self.token_cost + self.dedicated_cost


@dataclass
class UsageSummary:
    start: date
    end: date  # inclusive
    rows: list[UsageRow] = field(default_factory=list)

    def days(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]

    def by_day(self) -> list[UsageRow]:
        return self._grouped(lambda row: (row.day, "", ""), every_day=True)

    def by_model(self) -> list[UsageRow]:
        return self._grouped(lambda row: (self.start, row.model, ""))

    def by_deployment(self) -> list[UsageRow]:
        return self._grouped(lambda row: (self.start, "", row.deployment))

    def total(self) -> UsageRow:
        rows = self._grouped(lambda row: (self.start, "", ""))
        return rows[0] if rows else UsageRow(self.start, "", "", "")

    def _grouped(self, key, *, every_day=False) -> list[UsageRow]:
        groups: dict[tuple, UsageRow] = {}
        if every_day:
            for day in self.days():
                groups[(day, "", "")] = UsageRow(day, "", "", "")
        for row in self.rows:
            day, model, deployment = key(row)
            total = groups.setdefault(
                (day, model, deployment), UsageRow(day, model, deployment, row.currency)
            )
            total.currency = total.currency or row.currency
            total.requests += row.requests
            total.input_tokens += row.input_tokens
            total.output_tokens += row.output_tokens
            total.token_cost += row.token_cost
            total.dedicated_seconds += row.dedicated_seconds
            total.dedicated_cost += row.dedicated_cost
        ordered = sorted(groups.values(), key=lambda r: (r.day, r.model, r.deployment))
        if not every_day:
            ordered.sort(key=lambda r: r.cost, reverse=True)
        return ordered


def usage_summary(*, organization, days: int, today: date | None = None) -> UsageSummary:
    """The organization's usage over the last `days` UTC days, today included."""
    end = today or timezone.now().date()
    start = end - timedelta(days=days - 1)
    start_at = datetime.combine(start, time.min, tzinfo=UTC)
    tokens = list(
        UsageRollup.objects.filter(organization=organization, day__gte=start, day__lte=end)
        .values(
            "day",
            "model_version_id",
            "deployment_id",
            "currency",
            "input_price_per_million",
            "output_price_per_million",
        )
        .annotate(
            requests=Sum("requests"),
            input=Sum("input_tokens"),
            output=Sum("output_tokens"),
        )
        .order_by()
    )
    dedicated = list(
        DedicatedUsageRecord.objects.filter(organization=organization, start__gte=start_at)
        .annotate(day=TruncDate("start", tzinfo=UTC))
        .values("day", "model_version_id", "deployment_id", "currency", "price_per_hour")
        .annotate(seconds=Sum("seconds"))
        .order_by()
    )
    version_names = {
        version.pk: f"{version.model.display_name} {version.version}"
        for version in ModelVersion.objects.filter(
            pk__in={g["model_version_id"] for g in tokens + dedicated if g["model_version_id"]}
        ).select_related("model")
    }
    deployment_names = dict(
        Deployment.objects.filter(
            pk__in={str(g["deployment_id"]) for g in tokens + dedicated if g["deployment_id"]}
        ).values_list("pk", "name")
    )

    def names(group):
        model = version_names.get(group["model_version_id"], "unknown model")
        deployment_id = group["deployment_id"]
        deployment = deployment_names.get(_uuid(deployment_id), "") if deployment_id else ""
        return model, deployment or ("deleted deployment" if deployment_id else "none")

    rows: dict[tuple, UsageRow] = {}
    for group in tokens:
        model, deployment = names(group)
        row = rows.setdefault(
            (group["day"], model, deployment),
            UsageRow(group["day"], model, deployment, group["currency"]),
        )
        row.requests += group["requests"]
        row.input_tokens += group["input"]
        row.output_tokens += group["output"]
        row.token_cost += rate_tokens(
            input_tokens=group["input"],
            output_tokens=group["output"],
            input_per_million=group["input_price_per_million"],
            output_per_million=group["output_price_per_million"],
        )
    for group in dedicated:
        model, deployment = names(group)
        row = rows.setdefault(
            (group["day"], model, deployment),
            UsageRow(group["day"], model, deployment, group["currency"]),
        )
        row.dedicated_seconds += group["seconds"]
        row.dedicated_cost += rate_gpu_seconds(
            seconds=group["seconds"], per_hour=group["price_per_hour"]
        )
    ordered = sorted(rows.values(), key=lambda r: (r.day, r.model, r.deployment))
    return UsageSummary(start=start, end=end, rows=ordered)


def _uuid(value):
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
