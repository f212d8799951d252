import csv
import io

from rest_framework.renderers import BaseRenderer

from controlplane.spreadsheets import csv_cell


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
