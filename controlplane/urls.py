from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from controlplane import health
from controlplane.rest.docs import ApiDocsView

api_v1 = [
    path("", include("accounts.urls")),
    path("", include("billing.urls")),
    path("", include("catalog.urls")),
    path("", include("deployments.urls")),
]

# Unmatched paths under /api/ answer problem JSON like the API itself; the rest, the HTML page.
handler404 = "controlplane.rest.exceptions.page_not_found"

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", ApiDocsView.as_view(url_name="api-schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("", include("console.urls")),
]

# Errors raised outside a DRF view: problem JSON under /api/, 503 for database faults.
handler500 = "controlplane.rest.exceptions.server_error"
