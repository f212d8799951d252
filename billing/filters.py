import django_filters

from billing.models import Invoice


class InvoiceFilter(django_filters.FilterSet):
    payment_status = django_filters.ChoiceFilter(choices=Invoice.PaymentStatus.choices)
    since = django_filters.IsoDateTimeFilter(field_name="period_start", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="period_start", lookup_expr="lt")

    class Meta:
        model = Invoice
        fields = ["payment_status", "since", "until"]
