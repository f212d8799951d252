from datetime import UTC, date, timedelta

import stripe
from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from accounts.roles import Permission
from billing import documents, selectors
from billing.filters import InvoiceFilter
from billing.invoicing import invoice_draft
from billing.models import Invoice
from billing.periods import period_containing
from billing.renderers import CSVRenderer
from billing.serializers import (
    InvoiceDetailSerializer,
    InvoiceSerializer,
    ProjectBudgetSerializer,
    UpcomingInvoiceSerializer,
    UsageQuerySerializer,
    UsageReportSerializer,
)
from billing.stripe_sync import stripe_event_handle
from billing.usage import GROUP_BY, UsageRow, usage_report
from controlplane.rest.renderers import ErrorsAsJSONMixin

# The longest span one usage request may cover.
MAX_USAGE_DAYS = 400


class UsageApi(ErrorsAsJSONMixin, generics.GenericAPIView):
    """Usage and its cost per day, model, deployment or API key, as JSON or CSV
    (`?format=csv` or `Accept: text/csv`). Days are UTC; both ends are inclusive."""

    required_permissions = {"GET": Permission.USAGE_READ}
    renderer_classes = [JSONRenderer, CSVRenderer]
    serializer_class = UsageQuerySerializer
    pagination_class = None
    filter_backends: list = []

    csv_columns: list[str] | None = None

    def get_renderer_context(self):
        return {**super().get_renderer_context(), "csv_columns": self.csv_columns}

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "start",
                OpenApiTypes.DATE,
                description="First day (default: the start of the current billing period).",
            ),
            OpenApiParameter("end", OpenApiTypes.DATE, description="Last day (default: today)."),
            OpenApiParameter("group_by", str, enum=list(GROUP_BY)),
            OpenApiParameter(
                "tag", str, description="With group_by=tag: the `metadata` key to group by."
            ),
        ],
        responses={
            (200, "application/json"): UsageReportSerializer,
            (200, "text/csv"): OpenApiTypes.STR,
        },
    )
    def get(self, request):
        unknown = sorted(set(request.query_params) - {"start", "end", "group_by", "tag", "format"})
        if unknown:
            raise ValidationError(
                {unknown[0]: ["Unknown query parameter. Use start, end, group_by, tag or format."]}
            )
        empty = [name for name, value in request.query_params.items() if value == ""]
        if empty:
            raise ValidationError({empty[0]: ["Leave the parameter out instead of empty."]})
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        today = timezone.now().astimezone(UTC).date()
        start = query.validated_data.get("start") or period_containing(timezone.now()).start.date()
        end = query.validated_data.get("end") or today
        _check_range(start, end, today)
        group_by = query.validated_data["group_by"]
        organization = request.actor.organization
        rows = [
            row.as_dict(group_by)
            for row in usage_report(
                organization=organization,
                start=start,
                end=end,
                group_by=group_by,
                tag_key=query.validated_data.get("tag"),
            )
        ]
        if isinstance(request.accepted_renderer, CSVRenderer):
            self.csv_columns = list(UsageRow(key=None, label="").as_dict(group_by))
            filename = f"usage-{organization.slug}-{start}-{end}-{group_by}.csv"
            return Response(
                rows, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
            )
        return Response(
            {
                "start": start,
                "end": end,
                "group_by": group_by,
                "currency": organization.currency,
                "results": rows,
            }
        )


def _check_range(start: date, end: date, today: date) -> None:
    if start > end:
        raise ValidationError({"end": [f"end ({end}) is before start ({start}); swap them."]})
    if start > today:
        raise ValidationError({"start": [f"start ({start}) is in the future; today is {today}."]})
    if end > today:
        raise ValidationError(
            {"end": [f"end ({end}) is in the future; use today ({today}) at the latest."]}
        )
    if end - start > timedelta(days=MAX_USAGE_DAYS):
        raise ValidationError({"start": [f"Ask for at most {MAX_USAGE_DAYS} days at a time."]})


class ProjectBudgetApi(generics.GenericAPIView):
    """A project's budget, its spend this period and the alerts it raised (50/80/100 %). Set
    the budget with PATCH /api/v1/projects/{project_id} (monthly_budget)."""

    serializer_class = ProjectBudgetSerializer
    required_permissions = {"GET": Permission.USAGE_READ}
    filter_backends: list = []

    def get(self, request, project_id):
        from accounts.projects import project_get

        project = project_get(organization=request.actor.organization, project_id=project_id)
        return Response(ProjectBudgetSerializer(selectors.project_budget(project=project)).data)


class InvoiceListApi(generics.ListAPIView):
    """Finalized invoices, newest period first."""

    queryset = Invoice.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = InvoiceSerializer
    filterset_class = InvoiceFilter
    ordering_fields = ["period_start", "finalized_at", "total"]
    required_permissions = {"GET": Permission.BILLING_READ}

    def get_queryset(self):
        return selectors.invoice_list(organization=self.request.actor.organization)


class UpcomingInvoiceApi(generics.GenericAPIView):
    """The live draft of the current period: what its invoice says so far."""

    serializer_class = UpcomingInvoiceSerializer
    required_permissions = {"GET": Permission.BILLING_READ}
    pagination_class = None
    filter_backends: list = []

    def get(self, request):
        if request.query_params.keys() - {"format"}:
            raise ValidationError({"detail": ["This endpoint takes no query parameters."]})
        draft = invoice_draft(organization=request.actor.organization)
        return Response(UpcomingInvoiceSerializer(draft).data)


class InvoiceDetailApi(generics.GenericAPIView):
    serializer_class = InvoiceDetailSerializer
    required_permissions = {"GET": Permission.BILLING_READ}
    filter_backends: list = []

    def get_object(self):
        return get_object_or_404(
            selectors.invoice_list(organization=self.request.actor.organization),
            pk=self.kwargs["pk"],
        )

    def get(self, request, pk):
        return Response(InvoiceDetailSerializer(self.get_object()).data)


class InvoicePdfApi(InvoiceDetailApi):
    @extend_schema(responses={(200, "application/pdf"): OpenApiTypes.BINARY})
    def get(self, request, pk):
        invoice = self.get_object()
        response = HttpResponse(documents.invoice_pdf(invoice), content_type="application/pdf")
        response["Content-Disposition"] = f'attachment; filename="{invoice.number}.pdf"'
        return response


class InvoiceCsvApi(InvoiceDetailApi):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.STR})
    def get(self, request, pk):
        invoice = self.get_object()
        response = HttpResponse(documents.invoice_csv(invoice), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="{invoice.number}.csv"'
        return response


@csrf_exempt
@require_POST
def stripe_webhook(request):
    """Stripe's events, authenticated by the Stripe-Signature header (HMAC-SHA256 of the raw
    body with the endpoint's secret; older than 300 s is refused, against replays)."""
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        return _problem(503, "Stripe webhooks are not configured (STRIPE_WEBHOOK_SECRET).")
    try:
        event = stripe.Webhook.construct_event(
            request.body, request.headers.get("Stripe-Signature", ""), secret, tolerance=300
        )
    except ValueError:
        return _problem(400, "The body is not a Stripe event (invalid JSON).")
    except stripe.SignatureVerificationError as exc:
        return _problem(400, f"Bad Stripe-Signature: {exc.user_message or exc}")
    data_object = event["data"]["object"]
    handled = stripe_event_handle(
        event_id=event["id"],
        event_type=event["type"],
        data_object=data_object.to_dict() if hasattr(data_object, "to_dict") else dict(data_object),
    )
    return JsonResponse({"received": True, "duplicate": not handled})


def _problem(status: int, detail: str) -> JsonResponse:
    return JsonResponse(
        {
            "type": "urn:sirocco:problem:stripe_webhook",
            "title": "Invalid request" if status == 400 else "Unavailable",
            "status": status,
            "detail": detail,
        },
        status=status,
        content_type="application/problem+json",
    )
