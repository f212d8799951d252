"""The console's own helpers: estimates, charts and template filters."""

from dataclasses import dataclass
from decimal import Decimal

import pytest

from console import charts, estimates
from console.templatetags.console import model_card, money, tokens

pytestmark = pytest.mark.nodb


@dataclass
class Price:
    input_per_million: Decimal
    output_per_million: Decimal


def test_a_month_of_a_replica_is_730_hours():
    assert estimates.monthly_cost(Decimal("4.00")) == Decimal("2920.00")
    assert estimates.monthly_cost(Decimal("2.50"), replicas=2) == Decimal("3650.00")


def test_break_even_between_per_token_and_gpu_hour():
    price = Price(Decimal("0.70"), Decimal("0.70"))
    load = estimates.Load(requests_per_day=1000, input_tokens=500, output_tokens=500)
    result = estimates.break_even(
        token_price=price, dedicated_per_hour=Decimal("4"), replicas=1, load=load
    )
    # 1000 tokens × $0.70/1M = $0.0007 a request; × 1000 a day × 30.4167 days = $21.29.
    assert result.serverless_monthly == Decimal("21.29")
    assert result.dedicated_monthly == Decimal("2920.00")
    assert result.cheaper == "serverless"
    # $2920 a month ÷ 30.4167 days ÷ $0.0007 a request = 137,142.7 requests a day.
    assert result.break_even_requests_per_day == 137_143
    busier = estimates.break_even(
        token_price=price,
        dedicated_per_hour=Decimal("4"),
        replicas=1,
        load=estimates.Load(200_000, 500, 500),
    )
    assert busier.cheaper == "dedicated"


def test_break_even_without_one_of_the_prices():
    load = estimates.Load(10, 10, 10)
    only_dedicated = estimates.break_even(
        token_price=None, dedicated_per_hour=Decimal("1"), replicas=1, load=load
    )
    assert only_dedicated.serverless_monthly is None
    assert (only_dedicated.cheaper, only_dedicated.break_even_requests_per_day) == ("", None)
    free = estimates.break_even(
        token_price=Price(Decimal(0), Decimal(0)),
        dedicated_per_hour=Decimal("1"),
        replicas=1,
        load=load,
    )
    assert free.break_even_requests_per_day is None and free.cheaper == "serverless"


def test_money_and_token_formats():
    assert money(Decimal("1234.5"), "USD") == "$1,234.50"
    assert money(Decimal("0.0007"), "USD") == "$0.0007"
    assert money(Decimal("0.0000276"), "USD") == "$0.000028"
    assert money(Decimal("0.005"), "USD") == "$0.005"
    assert money(Decimal("0.5"), "USD") == "$0.50"
    assert money(Decimal("0"), "USD") == "$0.00"
    assert money(Decimal("0.5"), "EUR") == "€0.50"
    assert money(Decimal("3"), "CHF") == "3.00 CHF"
    assert money(None) == "—"
    assert tokens(32768) == "33k"
    assert tokens(4096) == "4.1k"
    assert tokens(1_000_000) == "1M"
    assert tokens(46_700_000_000) == "47B"
    assert tokens(12_900_000_000) == "13B"
    assert tokens(950) == "950"


def test_model_cards_render_markdown_and_drop_anything_active():
    html = model_card(
        "# Mixtral\n\n**Sparse** MoE. [Paper](https://arxiv.org/abs/2401.04088)\n\n"
        "<script>alert(1)</script><img src=https://cdn.example.com/x.png onerror=alert(1)>\n\n"
        "[click](javascript:alert(1))\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\ncode\n```"
    )
    assert (
        "<h3>Mixtral</h3>" in html
    )  # below the page's own headings and "<strong>Sparse</strong>" in html
    assert 'href="https://arxiv.org/abs/2401.04088"' in html and "nofollow" in html
    assert "<script" not in html and "<img" not in html and "onerror" not in html
    assert "javascript:" not in html
    assert "<table>" in html and "<pre><code>code" in html


def test_charts_are_accessible_svg_with_the_numbers_in_words():
    svg = charts.stacked_bar_chart(
        title="Tokens by day",
        categories=["05-01", "05-02"],
        series=[
            charts.Series("input", [Decimal(1200), Decimal(0)]),
            charts.Series("output", [Decimal(300), Decimal(50)]),
        ],
        unit="tokens",
    )
    assert svg.startswith('<svg class="chart"') and 'role="img"' in svg
    assert "<title" in svg and "05-01: input 1.2k tokens, output 300 tokens" in svg
    assert svg.count("<rect") == 3  # a zero is not drawn
    bars = charts.share_bars(
        title="Cost by model", rows=[("a<b", Decimal("1.5")), ("c", Decimal(3))], unit="USD"
    )
    assert "a&lt;b" in bars and "a<b" not in bars
    assert "c: 3 USD; a&lt;b: 1.5 USD" in bars  # biggest first
    empty = charts.stacked_bar_chart(title="None", categories=[], series=[])
    assert "No data." in empty


def test_nice_ceiling_and_short_numbers():
    assert charts.nice_ceiling(Decimal(0)) == 1
    assert charts.nice_ceiling(Decimal(730)) == 1000
    assert charts.nice_ceiling(Decimal(1500)) == 2000
    assert charts.nice_ceiling(Decimal("0.03")) == Decimal("0.05")
    assert charts.short_number(Decimal(12_345)) == "12.34k"
    assert charts.short_number(Decimal("2.5")) == "2.5"
    assert charts.short_number(Decimal("0.00125")) == "0.00125"
    assert charts.short_number(Decimal("0.0031500")) == "0.00315"
