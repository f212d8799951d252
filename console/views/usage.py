import csv
from decimal import Decimal

from django.http import HttpResponse

from accounts.roles import Permission
from billing import selectors as billing_selectors
from billing.budgets import spend_percent
from console import charts
from console.templatetags.console import money
from console.usage import usage_summary
from console.views.base import ConsoleView

# GPU-time amounts carry fifty digits; six places are plenty for a spreadsheet.
CSV_PLACES = Decimal("0.000001")
RANGES = {7: "7 days", 30: "30 days", 90: "90 days"}
DEFAULT_RANGE = 30


def chosen_range(request) -> int:
    try:
        days = int(request.GET.get("days", DEFAULT_RANGE))
    except ValueError:
        return DEFAULT_RANGE
    return days if days in RANGES else DEFAULT_RANGE


class UsageView(ConsoleView):
    """Tokens and cost by day, model and deployment; this period's spend against the budget."""

    section = "usage"
    required_permissions = {"GET": Permission.USAGE_READ}

    def get(self, request):
        organization = request.actor.organization
        days = chosen_range(request)
        summary = usage_summary(organization=organization, days=days)
        by_day = summary.by_day()
        labels = [row.day.strftime("%m-%d") for row in by_day]
        spend = billing_selectors.period_spend(organization=organization)
        context = {
            "days": days,
            "ranges": RANGES,
            "summary": summary,
            "total": summary.total(),
            "by_day": by_day,
            "by_model": summary.by_model(),
            "by_deployment": summary.by_deployment(),
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
                title=f"Cost a day ({organization.currency}), last {RANGES[days]}",
                categories=labels,
                series=[
                    charts.Series("Tokens", [r.token_cost for r in by_day]),
                    charts.Series("Dedicated GPU time", [r.dedicated_cost for r in by_day]),
                ],
                unit=organization.currency,
            ),
            "cost_legend": charts.legend(
                [charts.Series("Tokens", []), charts.Series("Dedicated GPU time", [])]
            ),
            "model_chart": charts.share_bars(
                title="Cost by model",
                rows=[(r.model, r.cost) for r in summary.by_model()],
                shown=lambda value: money(value, organization.currency),
            ),
            "deployment_chart": charts.share_bars(
                title="Cost by deployment",
                rows=[(r.deployment, r.cost) for r in summary.by_deployment()],
                shown=lambda value: money(value, organization.currency),
            ),
            "period_spend": spend,
            "spend_percent": spend_percent(spend, organization.monthly_spend_limit),
            "alerts": billing_selectors.budget_alerts_current(organization=organization),
        }
        return self.render("console/usage/dashboard.html", context)


class UsageExportView(ConsoleView):
    """The dashboard's rows as CSV: one line per day × model × deployment."""

    required_permissions = {"GET": Permission.USAGE_READ}

    def get(self, request):
        days = chosen_range(request)
        summary = usage_summary(organization=request.actor.organization, days=days)
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        filename = f"sirocco-usage-{request.actor.organization.slug}-{summary.start}-{summary.end}"
        response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
        writer = csv.writer(response)
        writer.writerow(
            [
                "day",
                "model",
                "deployment",
                "requests",
                "input_tokens",
                "output_tokens",
                "token_cost",
                "dedicated_seconds",
                "dedicated_cost",
                "currency",
            ]
        )
        for row in summary.rows:
            writer.writerow(
                [
                    row.day.isoformat(),
                    row.model,
                    row.deployment,
                    row.requests,
                    row.input_tokens,
                    row.output_tokens,
                    csv_amount(row.token_cost),
                    row.dedicated_seconds,
                    csv_amount(row.dedicated_cost),
                    row.currency,
                ]
            )
        return response


def csv_amount(amount: Decimal) -> str:
    return f"{amount.quantize(CSV_PLACES).normalize():f}"
