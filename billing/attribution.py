"""Cost attribution: the ledger grouped by project, by end user (OpenAI's `user`) or by the value
of one `metadata` tag, for the usage report, the invoice's per-project breakdown and the
reconciliation, which all read this one function.

Rows read straight from the ledger (UsageRecord, and DedicatedUsageRecord for projects): these
dimensions are not in the rollups, whose unique key would grow with every tag. Reports are over
one organization and a bounded range, taken by the (period, organization) index. Amounts are
recomputed from integer sums x the price each group was rated at, exactly like the rollups.

A ledger row written before projects existed has no project: it was its organization's default
project's (the migration put every key there), so it is reported as that project's.
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, F, Sum
from django.db.models.fields.json import KeyTextTransform

from accounts.models import default_project_id
from billing.models import DedicatedUsageRecord, UsageRecord
from billing.money import round_money
from billing.rating import rate_gpu_seconds, rate_tokens

DIMENSIONS = ("project", "user", "tag")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def valid_tag_key(key: str) -> bool:
    return bool(_TAG_KEY.match(key or ""))


@dataclass
class Group:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    gpu_seconds: int = 0
    amount: Decimal = field(default_factory=Decimal)


def ledger_groups(
    *,
    organization_id: int,
    dimension: str,
    tag_key: str | None = None,
    period_start: datetime | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict:
    """Usage of one organization per value of `dimension` (None: requests without one), over
    a billing period (`period_start`) or a time range (`since` <= occurred < `until`)."""
    if dimension not in DIMENSIONS:
        raise ValueError(dimension)
    if dimension == "tag" and not valid_tag_key(tag_key):
        raise ValueError(tag_key)
    expression = {
        "project": F("project_id"),
        "user": F("end_user"),
        "tag": KeyTextTransform(tag_key, "tags"),
    }[dimension]
    records = UsageRecord.objects.filter(organization_id=organization_id)
    segments = DedicatedUsageRecord.objects.filter(organization_id=organization_id)
    if period_start is not None:
        records = records.filter(period_start=period_start)
        segments = segments.filter(period_start=period_start)
    if since is not None:
        records = records.filter(occurred_at__gte=since)
        segments = segments.filter(start__gte=since)
    if until is not None:
        records = records.filter(occurred_at__lt=until)
        segments = segments.filter(start__lt=until)
    default = default_project_id(organization_id) if dimension == "project" else None
    groups: dict = defaultdict(Group)
    for row in (
        records.annotate(group=expression)
        .values(
            "group",
            "input_price_per_million",
            "output_price_per_million",
            "cached_input_price_per_million",
        )
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cached_tokens=Sum("cached_tokens"),
        )
        .order_by()
    ):
        group = groups[_key(row["group"], default)]
        group.requests += row["requests"]
        group.input_tokens += row["input_tokens"]
        group.output_tokens += row["output_tokens"]
        group.cached_tokens += row["cached_tokens"]
        group.amount += rate_tokens(
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            input_per_million=row["input_price_per_million"],
            output_per_million=row["output_price_per_million"],
            cached_tokens=row["cached_tokens"],
            cached_input_per_million=row["cached_input_price_per_million"],
        )
    # Dedicated time belongs to its deployment's project; it has no user or tag.
    fields = ["project_id", "price_per_hour"] if dimension == "project" else ["price_per_hour"]
    for row in segments.values(*fields).annotate(seconds=Sum("seconds")).order_by():
        group = groups[_key(row.get("project_id"), default)]
        group.gpu_seconds += row["seconds"]
        group.amount += rate_gpu_seconds(seconds=row["seconds"], per_hour=row["price_per_hour"])
    return dict(groups)


def _key(value, default):
    if value in (None, ""):
        return default
    return value


@dataclass
class ProjectShare:
    project_id: int
    name: str
    group: Group
    amount: Decimal  # rounded to the currency's minor unit


def invoice_projects(*, invoice) -> list[ProjectShare]:
    """An invoice's usage per project (before tax and credits), from the ledger of its
    organization and period: the exact amounts add up to the usage lines' exact amounts;
    each share is rounded on its own, so the shares may differ from the subtotal by a cent
    per project."""
    from accounts.models import Project

    groups = ledger_groups(
        organization_id=invoice.organization_id,
        dimension="project",
        period_start=invoice.period_start,
    )
    names = dict(
        Project.objects.filter(organization_id=invoice.organization_id).values_list("pk", "name")
    )
    shares = [
        ProjectShare(
            project_id=project_id,
            name=names.get(project_id, f"deleted project {project_id}"),
            group=group,
            amount=round_money(group.amount, invoice.currency),
        )
        for project_id, group in groups.items()
    ]
    return sorted(shares, key=lambda share: (-share.amount, share.name))
