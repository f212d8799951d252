"""Rating conserves money: however usage is split or grouped, the totals agree exactly."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.money import minor_unit_exponent, round_money, to_minor_units
from billing.rating import (
    PriceBook,
    invoice_totals,
    rate_gpu_seconds,
    rate_tokens,
    stored_amount,
)

pytestmark = pytest.mark.nodb

prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=2_000_000)
requests = st.lists(st.tuples(tokens, tokens), min_size=1, max_size=60)
currencies = st.sampled_from(["USD", "EUR", "JPY", "KWD", "GBP"])


@given(requests, prices, prices)
def test_per_request_amounts_add_up_to_the_amount_of_the_summed_tokens(reqs, p_in, p_out):
    per_request = sum(
        (
            rate_tokens(
                input_tokens=i, output_tokens=o, input_per_million=p_in, output_per_million=p_out
            )
            for i, o in reqs
        ),
        Decimal(0),
    )
    summed = rate_tokens(
        input_tokens=sum(i for i, _ in reqs),
        output_tokens=sum(o for _, o in reqs),
        input_per_million=p_in,
        output_per_million=p_out,
    )
    assert per_request == summed


@given(tokens, tokens, prices, prices)
def test_stored_token_amounts_are_exact(i, o, p_in, p_out):
    amount = rate_tokens(
        input_tokens=i, output_tokens=o, input_per_million=p_in, output_per_million=p_out
    )
    assert stored_amount(amount) == amount


@given(st.lists(st.integers(min_value=0, max_value=86_400), min_size=1, max_size=50), prices)
def test_gpu_time_split_into_segments_costs_what_the_whole_costs(segments, per_hour):
    whole = rate_gpu_seconds(seconds=sum(segments), per_hour=per_hour)
    with localcontext(prec=60):
        parts = sum((rate_gpu_seconds(seconds=s, per_hour=per_hour) for s in segments), Decimal(0))
    # Each part is exact to 50 digits; rounded to any currency they are indistinguishable.
    assert round_money(parts, "KWD") == round_money(whole, "KWD")
    assert abs(parts - whole) < Decimal("1e-30")


def test_gpu_time_by_the_second():
    assert rate_gpu_seconds(seconds=3600, per_hour=Decimal("2.50")) == Decimal("2.50")
    assert round_money(rate_gpu_seconds(seconds=1, per_hour=Decimal("3.60")), "USD") == Decimal(
        "0.00"
    )
    assert rate_gpu_seconds(seconds=1, per_hour=Decimal("3.60")) == Decimal("0.001")


def test_rounding_is_half_up_in_the_minor_unit():
    assert round_money(Decimal("0.125"), "USD") == Decimal("0.13")
    assert round_money(Decimal("0.124999"), "USD") == Decimal("0.12")
    assert round_money(Decimal("12.5"), "JPY") == Decimal("13")
    assert round_money(Decimal("1.0005"), "KWD") == Decimal("1.001")
    assert to_minor_units(Decimal("12.34"), "USD") == 1234
    assert to_minor_units(Decimal("1234"), "JPY") == 1234
    with pytest.raises(TypeError):
        round_money(0.1, "USD")
    with pytest.raises(ValueError):
        to_minor_units(Decimal("0.125"), "USD")


@given(
    st.lists(st.decimals(min_value=0, max_value=10_000, places=8), min_size=0, max_size=30),
    currencies,
    st.decimals(min_value=0, max_value=Decimal("0.5"), places=4),
    st.decimals(min_value=0, max_value=100_000, places=2),
)
def test_invoice_totals_conserve_money(exact_amounts, currency, tax_rate, credits):
    lines = [round_money(a, currency) for a in exact_amounts]
    credits = round_money(credits, currency)
    totals = invoice_totals(
        line_amounts=lines, currency=currency, tax_rate=tax_rate, credits_available=credits
    )
    assert totals.subtotal == sum(lines, Decimal(0))
    assert totals.tax == round_money(totals.subtotal * tax_rate, currency)
    assert totals.subtotal + totals.tax == totals.total + totals.credits_applied
    assert 0 <= totals.credits_applied <= credits
    assert totals.total >= 0
    exponent = minor_unit_exponent(currency)
    for value in (totals.subtotal, totals.tax, totals.total):
        assert value == value.quantize(Decimal(1).scaleb(-exponent))


def test_invoice_totals_refuse_unrounded_lines():
    with pytest.raises(ValueError):
        invoice_totals(line_amounts=[Decimal("0.001")], currency="USD", tax_rate=Decimal(0))


def test_price_book_picks_the_price_in_force():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    book = PriceBook()
    book.add(7, t0 + timedelta(days=10), "new")
    book.add(7, t0, "old")
    assert book.at(7, t0 - timedelta(seconds=1)) is None
    assert book.at(7, t0) == "old"
    assert book.at(7, t0 + timedelta(days=10) - timedelta(microseconds=1)) == "old"
    assert book.at(7, t0 + timedelta(days=10)) == "new"
    assert book.at(8, t0) is None
    assert book.changes_between(7, t0, t0 + timedelta(days=30)) == [t0 + timedelta(days=10)]
