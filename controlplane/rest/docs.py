"""The browsable API documentation (/api/docs/), Swagger UI from drf-spectacular-sidecar.

The split view serves Swagger UI's start-up script as a file of its own (`?script`), so the page
needs no inline script under the Content-Security-Policy; its template's small <style> block and
Swagger UI's own style attributes are allowed here only (the page is public and holds no tenant
data; scripts stay 'self').
"""

from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularSwaggerSplitView

from controlplane.rest.renderers import INLINE_STYLES


class ApiDocsView(SpectacularSwaggerSplitView):
    # An HTML page: OPTIONS (DRF's metadata, which this renderer cannot draw) is a 405.
    http_method_names = ["get", "head"]

    @extend_schema(exclude=True)  # the page, not an operation of the API
    def get(self, request, *args, **kwargs):
        response = super().get(request, *args, **kwargs)
        response._csp_update = INLINE_STYLES
        return response
