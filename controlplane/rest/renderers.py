"""Renderers of the REST API: CSV for reports (billing's, publishers'), and DRF's browsable API
under the Content-Security-Policy.

Its templates (rest_framework/base.html and friends) carry inline styles, which the policy
refuses elsewhere; this page alone may apply them. Scripts stay 'self' only: the page shows a
tenant's data, and an inline style cannot run code.
"""

import csv
import io

from csp.constants import UNSAFE_INLINE
from django.http import Http404
from rest_framework.exceptions import NotAcceptable
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer

from controlplane.spreadsheets import csv_cell

INLINE_STYLES = {"style-src": [UNSAFE_INLINE]}


class CSPBrowsableAPIRenderer(BrowsableAPIRenderer):
    def render(self, data, accepted_media_type=None, renderer_context=None):
        response = (renderer_context or {}).get("response")
        if response is not None:
            response._csp_update = INLINE_STYLES  # read by csp.middleware.CSPMiddleware
        return super().render(data, accepted_media_type, renderer_context)


class CSVRenderer(BaseRenderer):
    """Renders a list of flat dicts (or {"results": [...]}) as CSV with a header row; text a
    customer chose (key and deployment names) can never start a spreadsheet formula. An empty
    list is the header alone when the view names its columns (renderer context `csv_columns`)."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        rows = data.get("results", []) if isinstance(data, dict) else (data or [])
        out = io.StringIO()
        columns = list(rows[0]) if rows else (renderer_context or {}).get("csv_columns")
        if columns:
            writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        return out.getvalue().encode(self.charset)


class ErrorsAsJSONMixin:
    """Errors stay problem JSON even when the caller asked for CSV; an unknown `format` is a
    406 that names the formats (DRF's own answer would be a puzzling 404)."""

    def perform_content_negotiation(self, request, force=False):
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            raise NotAcceptable("Unknown format: use format=json or format=csv.") from None

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if response.status_code >= 400 and isinstance(response.accepted_renderer, CSVRenderer):
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = "application/problem+json"
        return response
