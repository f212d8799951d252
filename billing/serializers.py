from decimal import Decimal

from rest_framework import serializers

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


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True)
    credit_notes = CreditNoteSerializer(many=True, read_only=True)

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines", "credit_notes"]
        read_only_fields = fields


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
