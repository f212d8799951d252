"""Charts drawn on the server as inline SVG: no JavaScript, nothing fetched, readable by screen
readers (each chart is an `img` with a title and a description; pages show the same numbers in
a table beside it)."""

from dataclasses import dataclass
from decimal import Decimal
from itertools import count

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

PALETTE = ["#0b63c9", "#5fb4ff", "#1b7f3b", "#e0a100", "#b42318", "#7a4fc9", "#5b6470"]
_ids = count(1)


@dataclass(frozen=True)
class Series:
    label: str
    values: list  # one number per category (Decimal or int)
    color: str = ""


def nice_ceiling(value) -> Decimal:
    """The smallest 1, 2 or 5 × 10^n at least `value`, so gridlines land on round numbers."""
    value = Decimal(value)
    if value <= 0:
        return Decimal(1)
    magnitude = Decimal(10) ** (value.adjusted())
    for step in (1, 2, 5, 10):
        if magnitude * step >= value:
            return magnitude * step
    return magnitude * 10  # pragma: no cover


def short_number(value) -> str:
    """12_345 → "12.3k", 4_500_000 → "4.5M": tick labels that fit."""
    value = Decimal(value)
    for limit, suffix in ((Decimal(10**9), "B"), (Decimal(10**6), "M"), (Decimal(10**3), "k")):
        if abs(value) >= limit:
            return f"{(value / limit).normalize():f}"[:5].rstrip(".") + suffix
    if value == value.to_integral_value():
        return f"{int(value)}"
    if abs(value) >= 1:
        return f"{value.quantize(Decimal('0.01')).normalize():f}"
    # Cents and fractions of them (a day of light usage): keep three significant digits.
    return f"{value.quantize(Decimal(1).scaleb(value.adjusted() - 2)).normalize():f}"


def stacked_bar_chart(
    *, title: str, categories: list[str], series: list[Series], unit: str = "", height: int = 220
) -> SafeString:
    """Vertical bars, one per category, stacked by series (e.g. input and output tokens a day)."""
    chart_id = f"chart-{next(_ids)}"
    width, left, right, top, bottom = 760, 76, 12, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum((s.values[i] for s in series), Decimal(0)) for i in range(len(categories))]
    ceiling = nice_ceiling(max(totals, default=0))
    slot = plot_w / max(len(categories), 1)
    bar_w = max(min(slot * 0.7, 48), 2)
    parts = []
    for tick in range(5):
        value = ceiling * tick / 4
        y = top + plot_h - float(value / ceiling) * plot_h
        parts.append(
            format_html(
                '<line class="axis" x1="{}" x2="{}" y1="{}" y2="{}"/>'
                '<text x="{}" y="{}" text-anchor="end">{}</text>',
                left,
                width - right,
                f"{y:.1f}",
                f"{y:.1f}",
                left - 6,
                f"{y + 4:.1f}",
                short_number(value),
            )
        )
    label_every = max(1, round(len(categories) / 12))
    for index, category in enumerate(categories):
        x = left + slot * index + (slot - bar_w) / 2
        base = top + plot_h
        for position, one in enumerate(series):
            value = Decimal(one.values[index])
            if value <= 0:
                continue
            h = float(value / ceiling) * plot_h
            base -= h
            parts.append(
                format_html(
                    '<rect x="{}" y="{}" width="{}" height="{}" fill="{}">'
                    "<title>{}: {} {} {}</title></rect>",
                    f"{x:.1f}",
                    f"{base:.1f}",
                    f"{bar_w:.1f}",
                    f"{h:.1f}",
                    one.color or PALETTE[position % len(PALETTE)],
                    category,
                    one.label,
                    short_number(value),
                    unit,
                )
            )
        if index % label_every == 0:
            parts.append(
                format_html(
                    '<text x="{}" y="{}" text-anchor="middle">{}</text>',
                    f"{x + bar_w / 2:.1f}",
                    height - 12,
                    category,
                )
            )
    description = "; ".join(
        f"{category}: "
        + ", ".join(f"{s.label} {short_number(s.values[i])} {unit}".strip() for s in series)
        for i, category in enumerate(categories)
    )
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-labelledby="{}-title {}-desc">'
        '<title id="{}-title">{}</title><desc id="{}-desc">{}</desc>{}</svg>',
        width,
        height,
        chart_id,
        chart_id,
        chart_id,
        title,
        chart_id,
        description or "No data.",
        mark_safe("".join(parts)),  # noqa: S308 - every part was built with format_html
    )


def legend(series: list[Series]) -> SafeString:
    items = "".join(
        format_html(
            # A presentation attribute, not a style: the CSP allows no inline styles.
            '<span><svg class="swatch" viewBox="0 0 1 1"><rect width="1" height="1" fill="{}"/>'
            "</svg>{}</span>",
            one.color or PALETTE[position % len(PALETTE)],
            one.label,
        )
        for position, one in enumerate(series)
    )
    return mark_safe(f'<div class="legend" aria-hidden="true">{items}</div>')  # noqa: S308


def share_bars(
    *, title: str, rows: list[tuple[str, Decimal]], unit: str = "", shown=None
) -> SafeString:
    """Horizontal bars, one per row, longest first (e.g. cost by model). `shown` formats a
    value for its label (default: a short number and the unit)."""
    chart_id = f"chart-{next(_ids)}"
    rows = sorted(rows, key=lambda row: row[1], reverse=True)
    shown = shown or (lambda value: f"{short_number(value)} {unit}".strip())
    width, label_w, value_w, row_h = 480, 150, 80, 26
    height = max(len(rows), 1) * row_h + 8
    ceiling = max((Decimal(value) for _label, value in rows), default=Decimal(0)) or Decimal(1)
    bar_room = width - label_w - value_w
    parts = []
    for index, (label, value) in enumerate(rows):
        y = 4 + index * row_h
        w = float(Decimal(value) / ceiling) * bar_room
        short_label = label if len(label) <= 22 else label[:21] + "…"
        parts.append(
            format_html(
                '<text x="{}" y="{}" text-anchor="end">{}</text>'
                '<rect class="bar" x="{}" y="{}" width="{}" height="{}" rx="2">'
                "<title>{}: {}</title></rect>"
                '<text x="{}" y="{}">{}</text>',
                label_w - 8,
                y + 16,
                short_label,
                label_w,
                y + 3,
                f"{max(w, 1):.1f}",
                row_h - 8,
                label,
                shown(value),
                label_w + max(w, 1) + 6,
                y + 16,
                shown(value),
            )
        )
    description = "; ".join(f"{label}: {shown(value)}" for label, value in rows)
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-labelledby="{}-title {}-desc">'
        '<title id="{}-title">{}</title><desc id="{}-desc">{}</desc>{}</svg>',
        width,
        height,
        chart_id,
        chart_id,
        chart_id,
        title,
        chart_id,
        description or "No data.",
        mark_safe("".join(parts)),  # noqa: S308 - every part was built with format_html
    )
