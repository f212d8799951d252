"""Invoice and publisher statement documents: PDF (reportlab) and CSV, rendered from the
stored, immutable invoice or statement."""

import csv
import io
from decimal import Decimal

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from billing.models import Invoice, PublisherStatement
from billing.money import format_money
from billing.periods import Period
from controlplane.spreadsheets import csv_row

CSV_COLUMNS = [
    "invoice",
    "position",
    "kind",
    "description",
    "quantity",
    "unit",
    "unit_price",
    "amount",
    "currency",
]


def invoice_csv(invoice: Invoice) -> str:
    """One row per line, then the totals as rows of their own (kind `subtotal`, `total`…)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in invoice.lines.all():
        writer.writerow(
            csv_row(
                [
                    invoice.number,
                    line.position,
                    line.kind,
                    line.description,  # names the customer's deployment
                    f"{line.quantity.normalize():f}",
                    line.unit,
                    f"{line.unit_price.normalize():f}",
                    format_money(line.amount, invoice.currency),
                    invoice.currency,
                ]
            )
        )
    for kind, amount in _totals(invoice):
        writer.writerow(
            [
                invoice.number,
                "",
                kind,
                "",
                "",
                "",
                "",
                format_money(amount, invoice.currency),
                invoice.currency,
            ]
        )
    return out.getvalue()


def _totals(invoice: Invoice):
    credited = sum((note.amount for note in invoice.credit_notes.all()), 0)
    rows = [
        ("subtotal", invoice.subtotal),
        ("tax", invoice.tax),
        ("credits_applied", invoice.credits_applied),
        ("total", invoice.total),
    ]
    if credited:
        rows.append(("credit_notes", credited))
    return rows


def invoice_pdf(invoice: Invoice) -> bytes:
    buffer = io.BytesIO()
    period = Period(invoice.period_start, invoice.period_end)
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        title=f"Invoice {invoice.number}",
        author="Sirocco",
        leftMargin=18 * mm,
        rightMargin=18 * mm,
    )
    styles = getSampleStyleSheet()
    organization = invoice.organization
    story = [
        Paragraph(f"Invoice {invoice.number}", styles["Title"]),
        Paragraph(
            f"{_escape(organization.name)} ({_escape(organization.slug)})<br/>"
            f"{_escape(organization.billing_email)}",
            styles["Normal"],
        ),
        Spacer(1, 4 * mm),
        Paragraph(
            f"Billing period {period.label} (UTC) · finalized "
            f"{invoice.finalized_at:%Y-%m-%d} · currency {invoice.currency}",
            styles["Normal"],
        ),
        Spacer(1, 6 * mm),
    ]
    small = styles["BodyText"].clone("small", fontSize=8, leading=10)
    rows = [["#", "Description", "Quantity", "Unit price", "Amount"]]
    for line in invoice.lines.all():
        rows.append(
            [
                str(line.position),
                Paragraph(_escape(line.description), small),
                f"{line.quantity.normalize():f} {line.unit}".strip(),
                f"{line.unit_price.normalize():f}",
                format_money(line.amount, invoice.currency),
            ]
        )
    for label, amount in _totals(invoice):
        rows.append(
            [
                "",
                label.replace("_", " ").capitalize(),
                "",
                "",
                format_money(amount, invoice.currency),
            ]
        )
    table = Table(rows, colWidths=[10 * mm, 85 * mm, 35 * mm, 22 * mm, 22 * mm], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTSIZE", (0, 0), (-1, -1), 8),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
                ("ALIGN", (2, 1), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                (
                    "LINEABOVE",
                    (0, -len(_totals(invoice))),
                    (-1, -len(_totals(invoice))),
                    0.5,
                    colors.grey,
                ),
            ]
        )
    )
    story.append(table)
    notes = list(invoice.credit_notes.all())
    if notes:
        story.append(Spacer(1, 6 * mm))
        story.append(Paragraph("Credit notes", styles["Heading3"]))
        for note in notes:
            story.append(
                Paragraph(
                    f"{note.number}: {format_money(note.amount, invoice.currency)} {invoice.currency} — {_escape(note.reason)}",
                    styles["Normal"],
                )
            )
    document.build(story)
    return buffer.getvalue()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- publisher statements ----------------------------------------------------------------------

STATEMENT_CSV_COLUMNS = [
    "statement",
    "position",
    "kind",
    "description",
    "input_tokens",
    "output_tokens",
    "gpu_hours",
    "customers",
    "revenue",
    "share_percent",
    "share",
    "currency",
]


def _gpu_hours(seconds: int) -> str:
    return f"{(Decimal(seconds) / 3600).quantize(Decimal('0.000001')).normalize():f}"


def statement_csv(statement: PublisherStatement) -> str:
    """One row per line, then the totals (kind `revenue`, `share`, `adjustments`, `total`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATEMENT_CSV_COLUMNS)
    currency = statement.currency
    for line in statement.lines.all():
        writer.writerow(
            csv_row(
                [
                    statement.number,
                    line.position,
                    line.kind,
                    line.description,
                    line.input_tokens,
                    line.output_tokens,
                    _gpu_hours(line.gpu_seconds),
                    line.customers,
                    format_money(line.revenue, currency),
                    f"{line.share_percent.normalize():f}",
                    format_money(line.share, currency),
                    currency,
                ]
            )
        )
    for kind, amount in _statement_totals(statement):
        writer.writerow(
            [statement.number, "", kind, "", "", "", "", "", "", "", format_money(amount, currency),
             currency]
        )  # fmt: skip
    return out.getvalue()


def _statement_totals(statement: PublisherStatement):
    return [
        ("revenue", statement.revenue),
        ("share", statement.share),
        ("adjustments", statement.adjustments),
        ("total", statement.total),
    ]


def statement_pdf(statement: PublisherStatement) -> bytes:
    buffer = io.BytesIO()
    period = Period(statement.period_start, statement.period_end)
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        title=f"Publisher statement {statement.number}",
        author="Sirocco",
        leftMargin=18 * mm,
        rightMargin=18 * mm,
    )
    styles = getSampleStyleSheet()
    publisher = statement.publisher
    currency = statement.currency
    story = [
        Paragraph(f"Publisher statement {statement.number}", styles["Title"]),
        Paragraph(
            f"{_escape(publisher.display_name)} ({_escape(publisher.organization.slug)})",
            styles["Normal"],
        ),
        Spacer(1, 4 * mm),
        Paragraph(
            f"Billing period {period.label} (UTC) · final {statement.finalized_at:%Y-%m-%d} · "
            f"currency {currency}",
            styles["Normal"],
        ),
        Spacer(1, 6 * mm),
    ]
    small = styles["BodyText"].clone("small", fontSize=8, leading=10)
    rows = [["#", "Description", "Tokens in/out", "GPU h", "Customers", "Revenue", "%", "Share"]]
    for line in statement.lines.all():
        rows.append(
            [
                str(line.position),
                Paragraph(_escape(line.description), small),
                f"{line.input_tokens}/{line.output_tokens}",
                _gpu_hours(line.gpu_seconds),
                str(line.customers or ""),
                format_money(line.revenue, currency),
                f"{line.share_percent.normalize():f}",
                format_money(line.share, currency),
            ]
        )
    totals = _statement_totals(statement)
    for label, amount in totals:
        rows.append(["", label.capitalize(), "", "", "", "", "", format_money(amount, currency)])
    table = Table(
        rows,
        colWidths=[8 * mm, 62 * mm, 28 * mm, 14 * mm, 16 * mm, 18 * mm, 10 * mm, 18 * mm],
        repeatRows=1,
    )
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTSIZE", (0, 0), (-1, -1), 8),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
                ("ALIGN", (2, 1), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEABOVE", (0, -len(totals)), (-1, -len(totals)), 0.5, colors.grey),
            ]
        )
    )
    story.append(table)
    document.build(story)
    return buffer.getvalue()
