"""The arithmetic of rating: what usage costs at a given price, and how an invoice adds up.

Pure functions over Decimal, with no database, so property tests can hammer them.

- Tokens: amount = ((input - cached) x input price per 1M + cached x cached input price per 1M
  + output tokens x output price per 1M) / 1M, where cached are the prompt tokens the replica
  read from its prefix cache (at most the input tokens; at the input price when the price has no
  cached price). Prices have finitely many decimal places, so this is exact; it is stored
  unrounded per request.
- Dedicated GPU time: amount = seconds x price per hour / 3600. That is rarely a finite decimal,
  so the ledger keeps seconds and the price, and the amount is computed once per invoice line.
- Invoices: each line is rounded half-up to the currency's minor unit; the subtotal is the sum
  of the rounded lines; tax is the tax rate times the rounded subtotal, rounded; prepaid credits
  then pay what they can of subtotal + tax. Nothing else is ever rounded.
"""

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow

from billing.money import round_money

MILLION = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
# Token amounts must come out exact: Inexact traps, so a precision shortfall is an error, not
# a silent rounding. Fifty digits hold a billion-billion tokens at a price with 20 places.
_EXACT = Context(prec=50, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
# GPU time divides by 3600; fifty digits keep the error far below any currency's minor unit.
_PRECISE = Context(prec=50, traps=[InvalidOperation, DivisionByZero, Overflow])
# The places an unrounded amount is stored with (ledger rows, invoice lines).
AMOUNT_PLACES = 16
_AMOUNT_QUANTUM = Decimal(1).scaleb(-AMOUNT_PLACES)


def rate_tokens(
    *,
    input_tokens: int,
    output_tokens: int,
    input_per_million: Decimal,
    output_per_million: Decimal,
    cached_tokens: int = 0,
    cached_input_per_million: Decimal | None = None,
) -> Decimal:
    """The exact cost of a request's tokens (`cached_tokens` of its input tokens at the cached
    price, when there is one)."""
    if input_tokens < 0 or output_tokens < 0 or cached_tokens < 0:
        raise ValueError("token counts cannot be negative")
    ctx = _EXACT
    cached = min(cached_tokens, input_tokens) if cached_input_per_million is not None else 0
    return ctx.divide(
        ctx.add(
            ctx.add(
                ctx.multiply(Decimal(input_tokens - cached), input_per_million),
                ctx.multiply(Decimal(cached), cached_input_per_million or Decimal(0)),
            ),
            ctx.multiply(Decimal(output_tokens), output_per_million),
        ),
        MILLION,
    )


def rate_gpu_seconds(*, seconds: int, per_hour: Decimal) -> Decimal:
    """The cost of `seconds` of a replica priced `per_hour`, to fifty significant digits."""
    if seconds < 0:
        raise ValueError("seconds cannot be negative")
    return _PRECISE.divide(_PRECISE.multiply(Decimal(seconds), per_hour), SECONDS_PER_HOUR)


def stored_amount(amount: Decimal) -> Decimal:
    """An unrounded amount as the ledger stores it (token amounts fit exactly)."""
    return amount.quantize(_AMOUNT_QUANTUM, context=_PRECISE)


@dataclass(frozen=True)
class InvoiceTotals:
    subtotal: Decimal
    tax: Decimal
    credits_applied: Decimal
    total: Decimal


def invoice_totals(
    *,
    line_amounts: Iterable[Decimal],
    currency: str,
    tax_rate: Decimal,
    credits_available: Decimal = Decimal(0),
) -> InvoiceTotals:
    """Totals from already-rounded line amounts (see the module docstring for the rule)."""
    rounded = list(line_amounts)
    for amount in rounded:
        if round_money(amount, currency) != amount:
            raise ValueError(f"line amount {amount} is not rounded to {currency}'s minor unit")
    if tax_rate < 0:
        raise ValueError("the tax rate cannot be negative")
    subtotal = sum(rounded, Decimal(0))
    tax = round_money(subtotal * tax_rate, currency)
    due = subtotal + tax
    credits_applied = max(Decimal(0), min(credits_available, due))
    return InvoiceTotals(
        subtotal=subtotal,
        tax=tax,
        credits_applied=credits_applied,
        total=due - credits_applied,
    )


class PriceBook:
    """Effective-dated prices in memory, for rating a batch without a query per row.

    `add(key, effective_from, price)` for every price of the keys a batch needs, then
    `at(key, moment)` is the price whose effective_from is the latest at or before `moment`
    (None before the first one): the rule catalog.selectors.token_price_at applies.
    """

    def __init__(self):
        self._starts: dict = {}
        self._prices: dict = {}

    def add(self, key, effective_from, price) -> None:
        starts = self._starts.setdefault(key, [])
        index = bisect.bisect_right(starts, effective_from)
        starts.insert(index, effective_from)
        self._prices.setdefault(key, []).insert(index, price)

    def at(self, key, moment):
        starts = self._starts.get(key)
        if not starts:
            return None
        index = bisect.bisect_right(starts, moment)
        return self._prices[key][index - 1] if index else None

    def changes_between(self, key, start, end) -> list:
        """The effective_from moments strictly inside (start, end): where a price changes."""
        return [s for s in self._starts.get(key, ()) if start < s < end]
