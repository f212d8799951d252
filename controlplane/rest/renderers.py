"""Renderers of the REST API: CSV for reports (billing's, publishers'), and DRF's browsable API
under the Content-Security-Policy.

Its templates (rest_framework/base.html and friends) carry inline styles, which the policy
refuses elsewhere; this page alone may apply them. Scripts stay 'self' only: the page shows a
tenant's data, and an inline style cannot run code.
"""

import csv
import io

from csp.constants import UNSAFE_INLINE
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer

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
