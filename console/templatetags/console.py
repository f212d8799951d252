"""Template filters of the console: money, token counts, sizes, and model cards."""

import re
from decimal import ROUND_HALF_UP, Decimal

import markdown as markdown_lib
import nh3
from django import template
from django.utils.safestring import mark_safe

register = template.Library()

CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}

# What a model card may contain once rendered: text structure, code, tables and links. No
# images, styles or scripts: a card must not load anything from elsewhere or run anything.
CARD_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "dl", "dt", "em",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "kbd", "li", "ol", "p", "pre", "s",
    "strong", "sub", "summary", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
CARD_ATTRIBUTES = {"a": {"href", "title"}, "abbr": {"title"}, "td": {"align"}, "th": {"align"}}


@register.filter
def model_card(text: str) -> str:
    """Markdown → HTML, then sanitized (nh3): the card is written by whoever published it."""
    html = markdown_lib.markdown(text or "", extensions=["fenced_code", "tables", "sane_lists"])
    cleaned = nh3.clean(
        html,
        tags=CARD_TAGS,
        attributes=CARD_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
    # The page has its own h1 and h2s: a card's headings start below them.
    demoted = re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m[1]}h{min(int(m[2]) + 2, 6)}>", cleaned)
    return mark_safe(demoted)  # noqa: S308 - sanitized just above


@register.filter
def money(amount, currency: str = "USD") -> str:
    """Decimal(1234.5), "USD" → "$1,234.50". Under a cent, two significant digits
    ("$0.000028"): a day of light usage costs that, and "$0.00" would say it was free."""
    if amount is None or amount == "":
        return "—"
    amount = Decimal(amount)
    if amount and abs(amount) < Decimal("0.01"):
        places = Decimal(1).scaleb(min(amount.adjusted() - 1, -2))
        text = f"{amount.quantize(places, ROUND_HALF_UP).normalize():f}"
        if len(text.split(".")[1]) < 2:
            text = f"{amount.quantize(Decimal('0.01'), ROUND_HALF_UP)}"
    else:
        text = f"{amount.quantize(Decimal('0.01'), ROUND_HALF_UP):,}"
    symbol = CURRENCY_SYMBOLS.get(currency)
    if symbol:
        return f"-{symbol}{text[1:]}" if text.startswith("-") else f"{symbol}{text}"
    return f"{text} {currency}"


@register.filter
def tokens(value) -> str:
    """131072 → "131k", 32768 → "32k", 1_000_000 → "1M": context lengths and token counts."""
    if value is None:
        return "—"
    value = int(value)
    for limit, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if value >= limit:
            shown = value / limit
            return (
                f"{shown:.1f}".rstrip("0").rstrip(".") + suffix
                if shown < 10
                else f"{shown:.0f}{suffix}"
            )
    return str(value)


@register.filter
def parameters(value) -> str:
    """46_700_000_000 → "46.7B"."""
    return tokens(value)


@register.filter
def language_names(codes) -> str:
    return ", ".join(LANGUAGES.get(code, code) for code in codes or [])


LANGUAGES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
    "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "pl": "Polish", "tr": "Turkish",
    "sv": "Swedish", "da": "Danish", "fi": "Finnish", "no": "Norwegian", "cs": "Czech",
}  # fmt: skip


@register.filter
def hours(seconds) -> str:
    """GPU seconds as hours: 5400 → "1.5 h"."""
    return f"{Decimal(seconds) / 3600:.2f}".rstrip("0").rstrip(".") + " h"


@register.filter
def duration(value) -> str:
    """timedelta(minutes=15) → "15 minutes", timedelta(hours=2) → "2 hours"."""
    minutes = round(value.total_seconds() / 60)
    if minutes >= 120 and minutes % 60 == 0:
        return f"{minutes // 60} hours"
    return f"{minutes} minute{'' if minutes == 1 else 's'}"
