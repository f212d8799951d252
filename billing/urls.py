from django.urls import path

from billing import apis

urlpatterns = [
    path("usage", apis.UsageApi.as_view(), name="usage"),
    path("invoices", apis.InvoiceListApi.as_view(), name="invoice-list"),
    path("invoices/upcoming", apis.UpcomingInvoiceApi.as_view(), name="invoice-upcoming"),
    path("invoices/<int:pk>", apis.InvoiceDetailApi.as_view(), name="invoice-detail"),
    path("invoices/<int:pk>.pdf", apis.InvoicePdfApi.as_view(), name="invoice-pdf"),
    path("invoices/<int:pk>.csv", apis.InvoiceCsvApi.as_view(), name="invoice-csv"),
    path("billing/stripe/webhook", apis.stripe_webhook, name="stripe-webhook"),
]
