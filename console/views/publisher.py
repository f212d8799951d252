"""The publisher's pages: its listings with the review status of every proposed change, its
statements (PDF and CSV as the REST API gives them), and the analytics of its models. Shown to
members of a publisher organization only (anyone else: 404); they read what the REST API
gives them, through the same services."""

from datetime import timedelta

from django.http import Http404
from django.utils import timezone

from accounts.roles import Permission
from billing.publisher_analytics import publisher_analytics
from billing.statements import statement_list
from catalog.models import ListingChange, Publisher
from console import charts
from console.templatetags.console import money
from console.views.base import ConsoleView

RANGES = {7: "7 days", 30: "30 days", 90: "90 days"}


def publisher_of(request) -> Publisher:
    publisher = (
        Publisher.objects.filter(organization=request.actor.organization)
        .select_related("organization")
        .first()
    )
    if publisher is None:
        raise Http404("Your organization is not a publisher.")
    return publisher


class PublisherListingsView(ConsoleView):
    section = "publisher"

    def get(self, request):
        publisher = publisher_of(request)
        listings = list(publisher.listings.select_related("model"))
        changes = (
            ListingChange.objects.filter(listing__publisher=publisher)
            .select_related("listing")
            .prefetch_related("comments")
            .order_by("-created_at", "-id")
        )
        by_listing = {listing.pk: [] for listing in listings}
        for change in changes:
            by_listing[change.listing_id].append(change)
        return self.render(
            "console/publisher/listings.html",
            {
                "publisher": publisher,
                "listings": [(listing, by_listing[listing.pk]) for listing in listings],
                "waiting": sum(c.status == ListingChange.Status.SUBMITTED for c in changes),
            },
        )


class PublisherStatementsView(ConsoleView):
    section = "publisher"
    required_permissions = {"GET": Permission.BILLING_READ}

    def get(self, request):
        publisher = publisher_of(request)
        return self.render(
            "console/publisher/statements.html",
            {"publisher": publisher, "statements": list(statement_list(publisher=publisher))},
        )


class PublisherAnalyticsView(ConsoleView):
    section = "publisher"
    required_permissions = {"GET": Permission.BILLING_READ}

    def get(self, request):
        publisher = publisher_of(request)
        try:
            days = int(request.GET.get("days", 30))
        except ValueError:
            days = 30
        days = days if days in RANGES else 30
        today = timezone.now().date()
        report = publisher_analytics(
            publisher=publisher, start=today - timedelta(days=days - 1), end=today
        )
        day_list = report.day_list
        labels = [f"{day:%m-%d}" for day in day_list]

        def series(attribute):
            return [
                charts.Series(
                    model.model,
                    [getattr(model.days.get(day), attribute, 0) or 0 for day in day_list],
                    charts.PALETTE[index % len(charts.PALETTE)],
                )
                for index, model in enumerate(report.models)
            ]

        currency = report.currency
        return self.render(
            "console/publisher/analytics.html",
            {
                "publisher": publisher,
                "report": report,
                "days": days,
                "ranges": RANGES,
                "range_label": RANGES[days],
                "legend": charts.legend(series("requests")),
                "tokens_chart": charts.stacked_bar_chart(
                    title=f"Tokens a day by model, last {RANGES[days]}",
                    categories=labels,
                    series=[
                        charts.Series(s.label, s.values, s.color)
                        for s in _sum_series(series("input_tokens"), series("output_tokens"))
                    ],
                    unit="tokens",
                ),
                "revenue_chart": charts.stacked_bar_chart(
                    title=f"Revenue a day by model ({currency}), last {RANGES[days]}",
                    categories=labels,
                    series=series("revenue"),
                    unit=currency,
                ),
                "model_chart": charts.share_bars(
                    title="Revenue by model",
                    rows=[(m.model, m.total.revenue) for m in report.models],
                    shown=lambda value: money(value, currency),
                ),
            },
        )


def _sum_series(first, second):
    return [
        charts.Series(a.label, [x + y for x, y in zip(a.values, b.values, strict=True)], a.color)
        for a, b in zip(first, second, strict=True)
    ]
