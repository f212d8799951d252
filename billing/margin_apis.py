"""The operators' margin report on partner models, as JSON or CSV (billing/margins.py)."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from billing.margins import MarginRow, margin_report
from billing.periods import periods_in_month
from billing.renderers import CSVRenderer
from billing.serializers import MarginReportSerializer
from catalog.permissions import OperatorsOnly
from controlplane.rest.renderers import ErrorsAsJSONMixin


class MarginReportApi(ErrorsAsJSONMixin, generics.GenericAPIView):
    """Partner models per provider and billing period: revenue (as invoiced), the provider's
    cost and the margin, from the ledger. Operators only; `?format=csv` for a spreadsheet."""

    permission_classes = [OperatorsOnly]
    renderer_classes = [JSONRenderer, CSVRenderer]
    serializer_class = MarginReportSerializer
    pagination_class = None
    filter_backends: list = []
    csv_columns: list[str] | None = None

    def get_renderer_context(self):
        return {**super().get_renderer_context(), "csv_columns": self.csv_columns}

    @extend_schema(
        parameters=[
            OpenApiParameter("month", str, required=True, description="YYYY-MM"),
        ],
        responses={
            (200, "application/json"): MarginReportSerializer,
            (200, "text/csv"): OpenApiTypes.STR,
        },
    )
    def get(self, request):
        unknown = sorted(set(request.query_params) - {"month", "format"})
        if unknown:
            raise ValidationError({unknown[0]: ["Unknown query parameter. Use month or format."]})
        month = request.query_params.get("month", "")
        try:
            periods = periods_in_month(month)
        except ValueError as error:
            raise ValidationError({"month": [str(error)]}) from None
        rows = margin_report(period_starts=[period.start for period in periods])
        if isinstance(request.accepted_renderer, CSVRenderer):
            data = MarginReportSerializer({"month": month, "results": rows}).data["results"]
            self.csv_columns = list(MarginRow.__dataclass_fields__)
            return Response(
                data,
                headers={"Content-Disposition": f'attachment; filename="margins-{month}.csv"'},
            )
        return Response(MarginReportSerializer({"month": month, "results": rows}).data)
