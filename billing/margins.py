"""The operators' margin report on partner-hosted models: per billing period and provider
connection, what customers were invoiced (revenue), what the provider charges us (its cost,
recorded on each ledger row at ingestion) and the difference.

Both sides come from the ledger. Revenue is rounded the way invoices round it (per invoice
line: organization × model version × price × input or output), so a period's revenue per
currency is exactly the sum of the partner lines on its invoices (`billing_reconcile` checks
it); the provider's cost is the exact sum, rounded once per row of the report. The margin is
given only where revenue and cost are in the same currency.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, Sum

from billing.models import UsageRecord
from billing.money import round_money
from billing.rating import rate_tokens

ZERO = Decimal(0)


@dataclass
class MarginRow:
    period_start: datetime
    provider: str  # the connection's name ("" once it is deleted)
    provider_connection_id: int
    currency: str  # what customers paid in
    requests: int
    input_tokens: int
    output_tokens: int
    revenue: Decimal
    provider_currency: str  # "" when no provider cost was in force
    provider_cost: Decimal
    margin: Decimal | None


def invoiced_revenue(group: dict, currency: str) -> Decimal:
    """What an invoice charges for one ledger group: its input and output lines, each rounded
    (billing.invoicing.usage_lines' rule)."""
    total = ZERO
    for count, price in (
        (group["input_tokens"], group["input_price_per_million"]),
        (group["output_tokens"], group["output_price_per_million"]),
    ):
        if count:
            exact = rate_tokens(
                input_tokens=count,
                output_tokens=0,
                input_per_million=price,
                output_per_million=ZERO,
            )
            total += round_money(exact, currency)
    return total


def margin_report(*, period_starts: list[datetime]) -> list[MarginRow]:
    """One row per period × provider connection × customer currency × provider currency."""
    from catalog.models import ProviderConnection

    groups = (
        UsageRecord.objects.filter(
            period_start__in=period_starts, provider_connection_id__isnull=False
        )
        .values(
            "period_start",
            "provider_connection_id",
            "organization_id",
            "model_version_id",
            "currency",
            "input_price_per_million",
            "output_price_per_million",
            "provider_currency",
        )
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            provider_cost=Sum("provider_cost"),
        )
        .order_by()
    )
    rows: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, ZERO, ZERO])
    for group in groups:
        key = (
            group["period_start"],
            group["provider_connection_id"],
            group["currency"],
            group["provider_currency"],
        )
        sums = rows[key]
        sums[0] += group["requests"]
        sums[1] += group["input_tokens"]
        sums[2] += group["output_tokens"]
        sums[3] += invoiced_revenue(group, group["currency"])
        sums[4] += group["provider_cost"] or ZERO
    names = dict(
        ProviderConnection.objects.filter(pk__in={key[1] for key in rows}).values_list("pk", "name")
    )
    report = []
    for (period_start, connection_id, currency, provider_currency), sums in sorted(
        rows.items(), key=lambda item: (item[0][0], names.get(item[0][1], ""), *item[0][1:])
    ):
        cost = round_money(sums[4], provider_currency) if provider_currency else ZERO
        report.append(
            MarginRow(
                period_start=period_start,
                provider=names.get(connection_id, ""),
                provider_connection_id=connection_id,
                currency=currency,
                requests=sums[0],
                input_tokens=sums[1],
                output_tokens=sums[2],
                revenue=sums[3],
                provider_currency=provider_currency,
                provider_cost=cost,
                margin=sums[3] - cost if provider_currency == currency else None,
            )
        )
    return report
