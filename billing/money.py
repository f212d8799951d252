"""Currency arithmetic: amounts are Decimal everywhere and are rounded only on invoice lines.

Rounding is half-up to the currency's minor unit (ISO 4217 exponent: USD and EUR have cents,
JPY has none, KWD has three places).
"""

from decimal import ROUND_HALF_UP, Decimal

# ISO 4217 currencies whose minor unit is not 1/100. Every other code has two places.
_EXPONENT_EXCEPTIONS = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    **dict.fromkeys(["CLF", "UYW"], 4),
}

# Most decimal places any currency has; invoice amount columns are sized for it.
MAX_EXPONENT = 4


def minor_unit_exponent(currency: str) -> int:
    return _EXPONENT_EXCEPTIONS.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded half-up to the currency's minor unit (0.125 USD -> 0.13)."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"money must be Decimal, not {type(amount).__name__}")
    return amount.quantize(Decimal(1).scaleb(-minor_unit_exponent(currency)), ROUND_HALF_UP)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """A rounded amount in the currency's smallest unit, as payment APIs want it (12.34 -> 1234)."""
    rounded = round_money(amount, currency)
    if rounded != amount:
        raise ValueError(f"{amount} {currency} is not rounded to the currency's minor unit")
    return int(rounded.scaleb(minor_unit_exponent(currency)))


def format_money(amount: Decimal, currency: str) -> str:
    """A rounded amount as the currency writes it: "12.30" USD, "1230" JPY."""
    return f"{amount.quantize(Decimal(1).scaleb(-minor_unit_exponent(currency))):f}"
