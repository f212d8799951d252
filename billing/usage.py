"""Usage reports: the rollups (and dedicated segments) summed over days, by a dimension.

Amounts are recomputed from integer sums x the price each group was rated at, so they are
exact; they are shown to six places (invoices round per line, in the minor unit).
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from accounts.models import APIKey, Organization, Project
from billing.attribution import DIMENSIONS, ledger_groups
from billing.models import DedicatedUsageRecord, UsageRollup
from billing.rating import rate_gpu_seconds, rate_tokens

GROUP_BY = ("day", "model", "deployment", "api_key", "project", "user", "tag")
_DISPLAY = Decimal("0.000001")


@dataclass
class UsageRow:
    key: str | None
    label: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    gpu_seconds: int = 0
    amount: Decimal = Decimal(0)

    def as_dict(self, group_by: str) -> dict:
        return {
            group_by: self.key,
            "label": self.label,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "gpu_seconds": self.gpu_seconds,
            "amount": f"{self.amount.quantize(_DISPLAY):f}",
        }


def usage_report(
    *,
    organization: Organization,
    start: date,
    end: date,
    group_by: str,
    tag_key: str | None = None,
) -> list[UsageRow]:
    """Usage from `start` to `end` (both inclusive, UTC days) per `group_by` value (with
    group_by "tag": per value of the tag `tag_key`)."""
    if group_by not in GROUP_BY:
        raise ValueError(group_by)
    if group_by in DIMENSIONS:
        return _attribution_report(organization, start, end, group_by, tag_key)
    rollup_field = {
        "day": "day",
        "model": "model_version_id",
        "deployment": "deployment_id",
        "api_key": "api_key_id",
    }[group_by]
    token_rows = (
        UsageRollup.objects.filter(organization=organization, day__gte=start, day__lte=end)
        .values(
            rollup_field,
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
    segments = DedicatedUsageRecord.objects.filter(
        organization=organization,
        start__gte=datetime.combine(start, time.min, tzinfo=UTC),
        start__lt=datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )
    dedicated_field = {
        "day": "segment_day",
        "model": "model_version_id",
        "deployment": "deployment_id",
        "api_key": None,
    }[group_by]
    if group_by == "day":
        segments = segments.annotate(segment_day=TruncDate("start", tzinfo=UTC))
    dedicated_rows = (
        segments.values(*([dedicated_field] if dedicated_field else []), "price_per_hour")
        .annotate(seconds=Sum("seconds"), segments=Count("id"))
        .order_by()
    )

    rows: dict[str, UsageRow] = {}

    def row_for(value) -> UsageRow:
        key = _key(value)
        if key not in rows:
            rows[key] = UsageRow(key=key, label="")
        return rows[key]

    for group in token_rows:
        row = row_for(group[rollup_field])
        row.requests += group["requests"]
        row.input_tokens += group["input_tokens"]
        row.output_tokens += group["output_tokens"]
        row.cached_tokens += group["cached_tokens"]
        row.amount += rate_tokens(
            input_tokens=group["input_tokens"],
            output_tokens=group["output_tokens"],
            input_per_million=group["input_price_per_million"],
            output_per_million=group["output_price_per_million"],
            cached_tokens=group["cached_tokens"],
            cached_input_per_million=group["cached_input_price_per_million"],
        )
    for group in dedicated_rows:
        row = row_for(group[dedicated_field] if dedicated_field else None)
        row.gpu_seconds += group["seconds"]
        row.amount += rate_gpu_seconds(seconds=group["seconds"], per_hour=group["price_per_hour"])
    _label(rows, group_by, organization)
    return sorted(rows.values(), key=lambda r: (r.key is None, r.key or ""))


def _attribution_report(
    organization: Organization, start: date, end: date, group_by: str, tag_key: str | None
) -> list[UsageRow]:
    groups = ledger_groups(
        organization_id=organization.pk,
        dimension=group_by,
        tag_key=tag_key,
        since=datetime.combine(start, time.min, tzinfo=UTC),
        until=datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )
    rows: dict[str | None, UsageRow] = {}
    for value, group in groups.items():
        key = _key(value)
        rows[key] = UsageRow(
            key=key,
            label="",
            requests=group.requests,
            input_tokens=group.input_tokens,
            output_tokens=group.output_tokens,
            cached_tokens=group.cached_tokens,
            gpu_seconds=group.gpu_seconds,
            amount=group.amount,
        )
    _label(rows, group_by, organization)
    return sorted(rows.values(), key=lambda r: (r.key is None, r.key or ""))


def _key(value) -> str | None:
    if value in (None, "", 0):
        return None
    return value.isoformat() if isinstance(value, date) else str(value)


def _label(rows: dict[str, UsageRow], group_by: str, organization: Organization) -> None:
    ids = [r.key for r in rows.values() if r.key is not None]
    names: dict[str, str] = {}
    if group_by == "model" and ids:
        from catalog.models import ModelVersion

        names = {
            str(v.pk): str(v)
            for v in ModelVersion.objects.filter(pk__in=ids).select_related("model")
        }
    elif group_by == "deployment" and ids:
        from deployments.models import Deployment

        names = {
            str(pk): name
            for pk, name in Deployment.objects.filter(
                organization=organization, pk__in=ids
            ).values_list("pk", "name")
        }
    elif group_by == "project" and ids:
        names = {
            str(pk): name
            for pk, name in Project.objects.filter(
                organization=organization, pk__in=ids
            ).values_list("pk", "name")
        }
    elif group_by == "api_key" and ids:
        names = {
            str(key.pk): f"{key.name} ({key.display_prefix}…)"
            for key in APIKey.objects.filter(organization=organization, pk__in=ids)
        }
    for row in rows.values():
        if row.key is None:
            row.label = {
                "api_key": "no key (dedicated or console)",
                "day": "",
                "user": "no user",
                "tag": "untagged",
            }.get(group_by, "unknown")
        else:
            row.label = names.get(row.key, row.key)
