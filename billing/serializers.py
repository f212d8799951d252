from decimal import Decimal

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.attribution import invoice_projects, valid_tag_key
from billing.models import CreditNote, Invoice, InvoiceLine
from billing.money import format_money
from billing.periods import Period
from billing.usage import GROUP_BY

_MONEY_FIELDS = ("subtotal", "tax", "credits_applied", "total", "credited")


def _money_in_minor_units(data: dict) -> dict:
    """Amounts as the currency writes them ("12.34" USD, "1234" JPY), not with four places."""
    currency = data["currency"]
    for name in _MONEY_FIELDS:
        if data.get(name) is not None:
            data[name] = format_money(Decimal(data[name]), currency)
    for item in (*data.get("lines", ()), *data.get("credit_notes", ())):
        item["amount"] = format_money(Decimal(item["amount"]), currency)
    return data


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateField(required=False, help_text="First UTC day, inclusive.")
    end = serializers.DateField(required=False, help_text="Last UTC day, inclusive.")
    group_by = serializers.ChoiceField(
        choices=GROUP_BY,
        default="day",
        error_messages={"invalid_choice": f"Use one of: {', '.join(GROUP_BY)}."},
    )
    tag = serializers.CharField(
        required=False, help_text="With group_by=tag: the `metadata` key to group by."
    )

    def validate(self, attrs):
        tag = attrs.get("tag")
        if attrs.get("group_by") == "tag":
            if not tag:
                raise serializers.ValidationError(
                    {"tag": ["group_by=tag needs tag=<metadata key>, e.g. tag=team."]}
                )
            if not valid_tag_key(tag):
                raise serializers.ValidationError(
                    {"tag": ["A metadata key has 1 to 64 letters, digits, '_', '-', '.' or ':'."]}
                )
        elif tag is not None:
            raise serializers.ValidationError({"tag": ["tag goes with group_by=tag only."]})
        return attrs


class UsageRowSerializer(serializers.Serializer):
    """One row of the usage report; its key is the field named by `group_by`."""

    day = serializers.DateField(required=False, help_text="With group_by=day.")
    model = serializers.CharField(
        required=False, allow_null=True, help_text="With group_by=model: the version id."
    )
    deployment = serializers.CharField(
        required=False, allow_null=True, help_text="With group_by=deployment."
    )
    api_key = serializers.CharField(
        required=False, allow_null=True, help_text="With group_by=api_key."
    )
    project = serializers.CharField(
        required=False, allow_null=True, help_text="With group_by=project: the project id."
    )
    user = serializers.CharField(
        required=False, allow_null=True, help_text="With group_by=user: the request's `user`."
    )
    tag = serializers.CharField(
        required=False,
        allow_null=True,
        help_text="With group_by=tag: the value of the tag (null: requests without it).",
    )
    label = serializers.CharField()
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    gpu_seconds = serializers.IntegerField()
    amount = serializers.DecimalField(max_digits=18, decimal_places=6)


class UsageReportSerializer(serializers.Serializer):
    """The usage report (documents GET /usage; the view builds it from billing.usage)."""

    start = serializers.DateField()
    end = serializers.DateField()
    group_by = serializers.ChoiceField(choices=GROUP_BY)
    currency = serializers.CharField()
    results = UsageRowSerializer(many=True)


class InvoiceLineSerializer(serializers.ModelSerializer):
    class Meta:
        model = InvoiceLine
        fields = [
            "position",
            "kind",
            "description",
            "model_version_id",
            "deployment_id",
            "quantity",
            "unit",
            "unit_price",
            "amount",
        ]
        read_only_fields = fields


class CreditNoteSerializer(serializers.ModelSerializer):
    class Meta:
        model = CreditNote
        fields = ["number", "amount", "reason", "created_at"]
        read_only_fields = fields


class InvoiceSerializer(serializers.ModelSerializer):
    period = serializers.SerializerMethodField()
    status = serializers.SerializerMethodField()
    credited = serializers.SerializerMethodField()
    pdf_url = serializers.SerializerMethodField()
    csv_url = serializers.SerializerMethodField()

    class Meta:
        model = Invoice
        fields = [
            "id",
            "number",
            "status",
            "period",
            "period_start",
            "period_end",
            "currency",
            "subtotal",
            "tax_rate",
            "tax",
            "credits_applied",
            "total",
            "credited",
            "payment_status",
            "finalized_at",
            "paid_at",
            "pdf_url",
            "csv_url",
        ]
        read_only_fields = fields

    def to_representation(self, instance):
        return _money_in_minor_units(super().to_representation(instance))

    def get_period(self, invoice) -> str:
        return Period(invoice.period_start, invoice.period_end).label

    def get_status(self, invoice) -> str:
        return "finalized"

    def get_credited(self, invoice) -> str:
        return f"{sum((note.amount for note in invoice.credit_notes.all()), Decimal(0)):f}"

    def get_pdf_url(self, invoice) -> str:
        return f"/api/v1/invoices/{invoice.pk}.pdf"

    def get_csv_url(self, invoice) -> str:
        return f"/api/v1/invoices/{invoice.pk}.csv"


class InvoiceProjectSerializer(serializers.Serializer):
    """One project's share of an invoice's usage (before tax and credits)."""

    project = serializers.IntegerField(source="project_id")
    name = serializers.CharField()
    requests = serializers.IntegerField(source="group.requests")
    input_tokens = serializers.IntegerField(source="group.input_tokens")
    output_tokens = serializers.IntegerField(source="group.output_tokens")
    gpu_seconds = serializers.IntegerField(source="group.gpu_seconds")
    amount = serializers.CharField(help_text="Rounded to the currency's minor unit.")


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True)
    credit_notes = CreditNoteSerializer(many=True, read_only=True)
    projects = serializers.SerializerMethodField(
        help_text="The usage per project, from the ledger of the invoice's period."
    )

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines", "credit_notes", "projects"]
        read_only_fields = fields

    @extend_schema_field(InvoiceProjectSerializer(many=True))
    def get_projects(self, invoice) -> list:
        return [
            {
                **InvoiceProjectSerializer(share).data,
                "amount": format_money(share.amount, invoice.currency),
            }
            for share in invoice_projects(invoice=invoice)
        ]


class DraftLineSerializer(serializers.Serializer):
    kind = serializers.CharField()
    description = serializers.CharField()
    model_version_id = serializers.IntegerField(allow_null=True)
    deployment_id = serializers.UUIDField(allow_null=True)
    quantity = serializers.DecimalField(max_digits=28, decimal_places=6)
    unit = serializers.CharField()
    unit_price = serializers.DecimalField(max_digits=20, decimal_places=8)
    amount = serializers.DecimalField(max_digits=18, decimal_places=4)


class UpcomingInvoiceSerializer(serializers.Serializer):
    """The live draft: the same shape as an invoice, without number or id."""

    id = serializers.SerializerMethodField()
    number = serializers.SerializerMethodField()
    status = serializers.SerializerMethodField()
    period = serializers.CharField(source="period.label")
    period_start = serializers.DateTimeField(source="period.start")
    period_end = serializers.DateTimeField(source="period.end")
    currency = serializers.CharField()
    subtotal = serializers.DecimalField(max_digits=18, decimal_places=4)
    tax_rate = serializers.DecimalField(max_digits=7, decimal_places=6)
    tax = serializers.DecimalField(max_digits=18, decimal_places=4)
    credits_applied = serializers.DecimalField(max_digits=18, decimal_places=4)
    total = serializers.DecimalField(max_digits=18, decimal_places=4)
    lines = DraftLineSerializer(many=True, source="all_lines")

    def to_representation(self, instance):
        return _money_in_minor_units(super().to_representation(instance))

    def get_id(self, draft) -> int | None:
        return None  # a draft has no id or number until it is finalized

    def get_number(self, draft) -> str | None:
        return None

    def get_status(self, draft) -> str:
        return "draft"


class MarginRowSerializer(serializers.Serializer):
    period_start = serializers.DateTimeField()
    provider = serializers.CharField(help_text="The provider connection's name.")
    provider_connection_id = serializers.IntegerField()
    currency = serializers.CharField(help_text="What customers paid in.")
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    # Amounts as strings in the currency's minor unit, like invoices.
    revenue = serializers.CharField(help_text="As invoiced (per-line rounding), in currency.")
    provider_currency = serializers.CharField()
    provider_cost = serializers.CharField(help_text="In provider_currency.")
    margin = serializers.CharField(
        allow_null=True, help_text="revenue - provider_cost; null when their currencies differ."
    )

    def to_representation(self, row):
        data = super().to_representation(row)
        data["revenue"] = format_money(row.revenue, row.currency)
        data["provider_cost"] = (
            format_money(row.provider_cost, row.provider_currency) if row.provider_currency else "0"
        )
        data["margin"] = None if row.margin is None else format_money(row.margin, row.currency)
        return data


class MarginReportSerializer(serializers.Serializer):
    month = serializers.CharField()
    results = MarginRowSerializer(many=True)


class ProjectBudgetAlertSerializer(serializers.Serializer):
    threshold_percent = serializers.IntegerField()
    spend = serializers.DecimalField(max_digits=18, decimal_places=2)
    limit = serializers.DecimalField(max_digits=18, decimal_places=2)
    created_at = serializers.DateTimeField()


class ProjectBudgetSerializer(serializers.Serializer):
    """A project's monthly budget and its spend in the current billing period (ingested
    usage; the gateway also counts what is not ingested yet)."""

    project = serializers.IntegerField(source="project.pk")
    currency = serializers.CharField()
    monthly_budget = serializers.DecimalField(max_digits=14, decimal_places=2, allow_null=True)
    spend = serializers.DecimalField(max_digits=18, decimal_places=6)
    percent = serializers.DecimalField(max_digits=9, decimal_places=1, allow_null=True)
    alerts = ProjectBudgetAlertSerializer(many=True)
