from datetime import timedelta
from urllib.parse import urlencode

from django.urls import reverse
from django.utils import timezone

from accounts.roles import Permission
from billing import selectors as billing_selectors
from billing.budgets import spend_percent
from billing.usage import UsageRow, usage_report
from console import charts
from console.templatetags.console import money
from console.views.base import ConsoleView
from metering.models import UsageTag

RANGES = {7: "7 days", 30: "30 days", 90: "90 days"}
DEFAULT_RANGE = 30


def chosen_range(request) -> int:
    try:
        days = int(request.GET.get("days", DEFAULT_RANGE))
    except ValueError:
        return DEFAULT_RANGE
    return days if days in RANGES else DEFAULT_RANGE


class UsageView(ConsoleView):
    """Tokens and cost by day, model and deployment (billing's usage report, the one
    GET /api/v1/usage serves), and this period's spend against the budget."""

    section = "usage"
    required_permissions = {"GET": Permission.USAGE_READ}

    def get(self, request):
        organization = request.actor.organization
        currency = organization.currency
        days = chosen_range(request)
        end = timezone.now().date()
        start = end - timedelta(days=days - 1)
        report = {
            group_by: usage_report(
                organization=organization, start=start, end=end, group_by=group_by
            )
            for group_by in ("day", "model", "deployment", "project")
        }
        attribution, attribution_label, tag_keys = self.attribution(organization, start, end)
        # The report lists days with usage; the chart shows every day of the range.
        used = {row.key: row for row in report["day"]}
        by_day = [
            used.get(day.isoformat(), UsageRow(key=day.isoformat(), label=""))
            for day in (start + timedelta(days=n) for n in range(days))
        ]
        labels = [row.key[5:] for row in by_day]
        total = UsageRow(key=None, label="total")
        for row in report["day"]:
            for name in ("requests", "input_tokens", "output_tokens", "gpu_seconds", "amount"):
                setattr(total, name, getattr(total, name) + getattr(row, name))
        spend = billing_selectors.period_spend(organization=organization)
        by_cost = lambda rows: sorted(rows, key=lambda r: r.amount, reverse=True)  # noqa: E731
        context = {
            "days": days,
            "range_label": RANGES[days],
            "ranges": RANGES,
            "total": total,
            "by_model": by_cost(report["model"]),
            "by_deployment": by_cost(report["deployment"]),
            "tokens_chart": charts.stacked_bar_chart(
                title=f"Tokens a day, last {RANGES[days]}",
                categories=labels,
                series=[
                    charts.Series("Input tokens", [r.input_tokens for r in by_day]),
                    charts.Series("Output tokens", [r.output_tokens for r in by_day]),
                ],
                unit="tokens",
            ),
            "tokens_legend": charts.legend(
                [charts.Series("Input tokens", []), charts.Series("Output tokens", [])]
            ),
            "cost_chart": charts.stacked_bar_chart(
                title=f"Cost a day ({currency}), last {RANGES[days]}",
                categories=labels,
                series=[charts.Series("Cost", [r.amount for r in by_day])],
                unit=currency,
            ),
            "model_chart": charts.share_bars(
                title="Cost by model",
                rows=[(r.label, r.amount) for r in report["model"]],
                shown=lambda value: money(value, currency),
            ),
            "deployment_chart": charts.share_bars(
                title="Cost by deployment",
                rows=[(r.label, r.amount) for r in report["deployment"]],
                shown=lambda value: money(value, currency),
            ),
            "by_project": by_cost(report["project"]),
            "project_chart": charts.share_bars(
                title="Cost by project",
                rows=[(r.label, r.amount) for r in by_cost(report["project"])],
                shown=lambda value: money(value, currency),
            ),
            "attribution": by_cost(attribution),
            "attribution_label": attribution_label,
            "attribution_chart": charts.share_bars(
                title=f"Cost by {attribution_label}",
                rows=[(r.label, r.amount) for r in by_cost(attribution)],
                shown=lambda value: money(value, currency),
            ),
            "tag_keys": tag_keys,
            "by": request.GET.get("by", "user"),
            "exports": {
                label: f"{reverse('usage')}?"
                + urlencode({"format": "csv", "group_by": group_by, "start": start, "end": end})
                for label, group_by in (
                    ("by day", "day"),
                    ("by model", "model"),
                    ("by deployment", "deployment"),
                    ("by API key", "api_key"),
                    ("by project", "project"),
                    ("by user", "user"),
                )
            },
            "period_spend": spend,
            "spend_percent": spend_percent(spend, organization.monthly_spend_limit),
            "alerts": billing_selectors.budget_alerts_current(organization=organization),
        }
        return self.render("console/usage/dashboard.html", context)

    def attribution(self, organization, start, end):
        """The report by end user (`?by=user`, the default) or by one tag (`?by=tag:team`),
        among the tag keys the organization's requests used."""
        tag_keys = list(
            UsageTag.objects.filter(organization=organization)
            .values_list("key", flat=True)
            .distinct()
            .order_by("key")
        )
        by = self.request.GET.get("by", "user")
        tag_key = by.removeprefix("tag:") if by.startswith("tag:") else None
        if tag_key in tag_keys:
            rows = usage_report(
                organization=organization, start=start, end=end, group_by="tag", tag_key=tag_key
            )
            return rows, f"tag “{tag_key}”", tag_keys
        rows = usage_report(organization=organization, start=start, end=end, group_by="user")
        return rows, "end user", tag_keys
