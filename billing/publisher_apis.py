"""REST endpoints of a publisher's money: the revenue share of each listing (operators set it;
the publisher reads it) and its statements (JSON, PDF, CSV). Members of the publisher read
them with `billing.read`; operators read every publisher's; anyone else gets 404."""

from datetime import timedelta
from decimal import Decimal

from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from accounts.roles import Permission
from accounts.services import require
from billing import documents, payouts, statements
from billing.models import PublisherStatement, RevenueShare, StatementLine
from billing.money import format_money
from billing.publisher_analytics import publisher_analytics
from catalog.permissions import is_operator, require_operator
from catalog.publisher_apis import PublisherApi
from catalog.publishers import require_publisher_member
from controlplane.errors import NotFound, ValidationFailed
from controlplane.rest.serializers import MoneyField, StrictSerializer


class RevenueShareSerializer(serializers.ModelSerializer):
    class Meta:
        model = RevenueShare
        fields = ["percent", "effective_from", "created_by_label", "created_at"]
        read_only_fields = fields


class RevenueShareCreateSerializer(StrictSerializer):
    percent = MoneyField(max_digits=5, decimal_places=2)
    effective_from = serializers.DateTimeField(help_text="The start of an open billing period.")


def _formatted(data: dict, currency: str) -> dict:
    """Amounts as the currency writes them ("12.34" USD), as invoices show them."""
    for name in ("revenue", "share", "adjustments", "total"):
        if data.get(name) is not None:
            data[name] = format_money(Decimal(data[name]), currency)
    return data


class StatementLineSerializer(serializers.ModelSerializer):
    class Meta:
        model = StatementLine
        fields = [
            "position",
            "kind",
            "description",
            "input_tokens",
            "output_tokens",
            "gpu_seconds",
            "customers",
            "revenue",
            "share_percent",
            "share",
        ]
        read_only_fields = fields


class StatementSerializer(serializers.ModelSerializer):
    publisher = serializers.CharField(source="publisher.organization.slug", read_only=True)

    class Meta:
        model = PublisherStatement
        fields = [
            "number",
            "publisher",
            "period_start",
            "period_end",
            "currency",
            "revenue",
            "share",
            "adjustments",
            "total",
            "finalized_at",
            "payout_status",
            "paid_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance):
        data = _formatted(super().to_representation(instance), instance.currency)
        for line in data.get("lines", ()):
            _formatted(line, instance.currency)
        return data


class StatementDetailSerializer(StatementSerializer):
    lines = StatementLineSerializer(many=True, read_only=True)

    class Meta(StatementSerializer.Meta):
        fields = [*StatementSerializer.Meta.fields, "lines"]
        read_only_fields = fields


class RevenueShareListApi(PublisherApi):
    """A listing's revenue shares, newest first. Operators add one with POST: it starts with
    an open billing period and is never edited."""

    serializer_class = RevenueShareSerializer
    queryset = RevenueShare.objects.none()

    @extend_schema(
        operation_id="publishers_listings_revenue_shares_list",
        responses=RevenueShareSerializer(many=True),
    )
    def get(self, request, slug, listing):
        shares = statements.revenue_share_list(listing=self.get_listing())
        return Response(RevenueShareSerializer(shares, many=True).data)

    @extend_schema(request=RevenueShareCreateSerializer, responses={201: RevenueShareSerializer})
    def post(self, request, slug, listing):
        target = self.get_listing()
        require_operator(request.actor)
        serializer = RevenueShareCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        share = statements.revenue_share_set(
            actor=request.actor, listing=target, **serializer.validated_data
        )
        return Response(RevenueShareSerializer(share).data, status=status.HTTP_201_CREATED)


class StatementApi(PublisherApi):
    queryset = PublisherStatement.objects.none()

    def statements(self):
        publisher = self.get_publisher()
        actor = self.request.actor
        require_publisher_member(actor, publisher)
        if not is_operator(actor):
            require(actor, Permission.BILLING_READ)
        return statements.statement_list(publisher=publisher).select_related(
            "publisher__organization"
        )

    def get_statement(self) -> PublisherStatement:
        statement = self.statements().filter(number=self.kwargs["number"]).first()
        if statement is None:
            raise NotFound("No such statement.")
        return statement


class StatementListApi(StatementApi):
    """The publisher's statements, newest period first."""

    serializer_class = StatementSerializer

    @extend_schema(
        operation_id="publishers_statements_list", responses=StatementSerializer(many=True)
    )
    def get(self, request, slug):
        return Response(StatementSerializer(self.statements(), many=True).data)


class StatementDetailApi(StatementApi):
    serializer_class = StatementDetailSerializer

    def get(self, request, slug, number):
        return Response(StatementDetailSerializer(self.get_statement()).data)


class StatementPdfApi(StatementApi):
    serializer_class = StatementSerializer

    @extend_schema(responses={(200, "application/pdf"): OpenApiTypes.BINARY})
    def get(self, request, slug, number):
        statement = self.get_statement()
        response = HttpResponse(documents.statement_pdf(statement), content_type="application/pdf")
        response["Content-Disposition"] = f'attachment; filename="{statement.number}.pdf"'
        return response


class StatementCsvApi(StatementApi):
    serializer_class = StatementSerializer

    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.STR})
    def get(self, request, slug, number):
        statement = self.get_statement()
        response = HttpResponse(documents.statement_csv(statement), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="{statement.number}.csv"'
        return response


class PayoutAccountSerializer(StrictSerializer):
    account_id = serializers.CharField(
        max_length=64,
        required=False,
        help_text="Operators: pay into this existing connected account (acct_…).",
    )
    refresh_url = serializers.URLField(
        required=False, help_text="Where Stripe sends the publisher if the link expired."
    )
    return_url = serializers.URLField(
        required=False, help_text="Where Stripe sends the publisher once onboarded."
    )

    def validate(self, data):
        if "account_id" in data or {"refresh_url", "return_url"} <= set(data):
            return data
        raise serializers.ValidationError(
            "Give account_id (operators), or refresh_url and return_url for an onboarding link."
        )


class PayoutAccountAnswerSerializer(serializers.Serializer):
    payouts_linked = serializers.BooleanField()
    onboarding_url = serializers.CharField(allow_blank=True)


class PayoutAccountApi(PublisherApi):
    """Link the publisher's Stripe Connect account that its statements are paid into: the
    platform makes an Express account and answers an onboarding link for the publisher's
    people (billing.write), or an operator names an existing account."""

    serializer_class = PayoutAccountAnswerSerializer
    queryset = PublisherStatement.objects.none()

    @extend_schema(request=PayoutAccountSerializer, responses=PayoutAccountAnswerSerializer)
    def post(self, request, slug):
        publisher = self.get_publisher()
        serializer = PayoutAccountSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = serializer.validated_data
        url = ""
        if "account_id" in fields:
            payouts.publisher_account_link(
                actor=request.actor, publisher=publisher, account_id=fields["account_id"]
            )
        else:
            url = payouts.publisher_connect_account(
                actor=request.actor,
                publisher=publisher,
                refresh_url=fields["refresh_url"],
                return_url=fields["return_url"],
            )
        return Response({"payouts_linked": True, "onboarding_url": url})


class AnalyticsModelSerializer(serializers.Serializer):
    model = serializers.CharField()
    requests = serializers.IntegerField(source="total.requests")
    input_tokens = serializers.IntegerField(source="total.input_tokens")
    output_tokens = serializers.IntegerField(source="total.output_tokens")
    gpu_seconds = serializers.IntegerField(source="total.gpu_seconds")
    revenue = serializers.DecimalField(
        source="total.revenue", max_digits=34, decimal_places=6, coerce_to_string=True
    )
    customers = serializers.IntegerField()
    days = serializers.SerializerMethodField()

    def get_days(self, model) -> list[dict]:
        """Per UTC day with use: requests, tokens, GPU-seconds, revenue (6 places)."""
        return [
            {
                "day": day.isoformat(),
                "requests": figures.requests,
                "input_tokens": figures.input_tokens,
                "output_tokens": figures.output_tokens,
                "gpu_seconds": figures.gpu_seconds,
                "revenue": f"{figures.revenue.quantize(Decimal('0.000001')):f}",
            }
            for day, figures in sorted(model.days.items())
        ]


class AnalyticsSerializer(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    currency = serializers.CharField()
    customers = serializers.IntegerField(help_text="Customer organizations, counted.")
    models = AnalyticsModelSerializer(many=True)
    named_customers = serializers.SerializerMethodField()

    def get_named_customers(self, report) -> list[str]:
        """The customers who accepted terms letting the publisher know them."""
        return [slug for slug, _figures in report.named]


class PublisherAnalyticsApi(StatementApi):
    """Use of the publisher's models per model and day over the last `days` (7 to 400),
    aggregated over customers; named only where a customer agreed in the terms."""

    serializer_class = AnalyticsSerializer

    @extend_schema(
        parameters=[OpenApiParameter("days", int, required=False, description="Default 30.")]
    )
    def get(self, request, slug):
        self.statements()  # the same readers as the statements
        try:
            days = int(request.query_params.get("days", 30))
        except ValueError:
            days = 0
        if not 1 <= days <= 400:
            raise ValidationFailed("days is a whole number from 1 to 400.", field="days")
        today = timezone.now().date()
        report = publisher_analytics(
            publisher=self.get_publisher(), start=today - timedelta(days=days - 1), end=today
        )
        return Response(AnalyticsSerializer(report).data)
