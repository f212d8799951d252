from django.urls import path

from billing import apis, margin_apis, publisher_apis

urlpatterns = [
    path("usage", apis.UsageApi.as_view(), name="usage"),
    path(
        "projects/<int:project_id>/budget",
        apis.ProjectBudgetApi.as_view(),
        name="project-budget",
    ),
    path("invoices", apis.InvoiceListApi.as_view(), name="invoice-list"),
    path("invoices/upcoming", apis.UpcomingInvoiceApi.as_view(), name="invoice-upcoming"),
    path("invoices/<int:pk>", apis.InvoiceDetailApi.as_view(), name="invoice-detail"),
    path("invoices/<int:pk>.pdf", apis.InvoicePdfApi.as_view(), name="invoice-pdf"),
    path("invoices/<int:pk>.csv", apis.InvoiceCsvApi.as_view(), name="invoice-csv"),
    path(
        "publishers/<str:slug>/listings/<str:listing>/revenue-shares",
        publisher_apis.RevenueShareListApi.as_view(),
        name="revenue-share-list",
    ),
    path(
        "publishers/<str:slug>/analytics",
        publisher_apis.PublisherAnalyticsApi.as_view(),
        name="publisher-analytics",
    ),
    path(
        "publishers/<str:slug>/payout-account",
        publisher_apis.PayoutAccountApi.as_view(),
        name="publisher-payout-account",
    ),
    path(
        "publishers/<str:slug>/statements",
        publisher_apis.StatementListApi.as_view(),
        name="statement-list",
    ),
    path(
        "publishers/<str:slug>/statements/<str:number>.pdf",
        publisher_apis.StatementPdfApi.as_view(),
        name="statement-pdf",
    ),
    path(
        "publishers/<str:slug>/statements/<str:number>.csv",
        publisher_apis.StatementCsvApi.as_view(),
        name="statement-csv",
    ),
    path(
        "publishers/<str:slug>/statements/<str:number>",
        publisher_apis.StatementDetailApi.as_view(),
        name="statement-detail",
    ),
    path("billing/margins", margin_apis.MarginReportApi.as_view(), name="billing-margins"),
    path("billing/stripe/webhook", apis.stripe_webhook, name="stripe-webhook"),
]
