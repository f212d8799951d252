"""An invoice as a PDF (reportlab): what the invoice page shows, on A4, with the same numbers."""

from io import BytesIO

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from console.templatetags.console import money


def invoice_pdf(invoice, *, lines, organization) -> bytes:
    buffer = BytesIO()
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=18 * mm,
        bottomMargin=18 * mm,
        title=f"Invoice {invoice.number}",
        author="Sirocco",
    )
    styles = getSampleStyleSheet()
    currency = invoice.currency
    period = f"{invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d} (UTC, end excluded)"
    story = [
        Paragraph(f"Invoice {invoice.number}", styles["Title"]),
        Paragraph(
            f"<b>{_escape(organization.name)}</b> ({_escape(organization.slug)})<br/>"
            f"Billing email: {_escape(organization.billing_email or '-')}<br/>"
            f"Period: {period}<br/>Issued: {invoice.finalized_at:%Y-%m-%d %H:%M} UTC<br/>"
            f"Status: {invoice.get_payment_status_display()}",
            styles["Normal"],
        ),
        Spacer(1, 8 * mm),
    ]
    rows = [["Description", "Quantity", "Unit price", "Amount"]]
    for line in lines:
        rows.append(
            [
                Paragraph(_escape(line.description), styles["BodyText"]),
                f"{line.quantity.normalize():f} {line.unit}".strip(),
                f"{line.unit_price.normalize():f}" if line.unit else "",
                money(line.amount, currency),
            ]
        )
    rows += [
        ["", "", "Subtotal", money(invoice.subtotal, currency)],
        ["", "", "Tax", money(invoice.tax, currency)],
        ["", "", "Credits", money(-invoice.credits_applied, currency)],
        ["", "", "Total due", money(invoice.total, currency)],
    ]
    table = Table(rows, colWidths=[85 * mm, 35 * mm, 25 * mm, 29 * mm], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black),
                ("ALIGN", (1, 0), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEABOVE", (2, -4), (-1, -4), 0.5, colors.grey),
                ("FONTNAME", (2, -1), (-1, -1), "Helvetica-Bold"),
            ]
        )
    )
    story.append(table)
    document.build(story)
    return buffer.getvalue()


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
