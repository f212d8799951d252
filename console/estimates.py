"""Cost estimates the console shows before anyone deploys: a month of a dedicated replica, and
where per-token (serverless) and per-GPU-hour (dedicated) pricing break even.

These are estimates for a person choosing, not what is billed: billing rates the real usage
with the prices in force (replica-seconds for dedicated, tokens for serverless).
"""

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

# An average month: 365 × 24 / 12. What cloud price pages use for "per month".
HOURS_PER_MONTH = Decimal(730)
DAYS_PER_MONTH = Decimal("30.4167")
MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


def monthly_cost(per_hour: Decimal, replicas: int = 1) -> Decimal:
    """A replica-hour price held for an average month."""
    return (Decimal(per_hour) * HOURS_PER_MONTH * replicas).quantize(CENT, ROUND_HALF_UP)


@dataclass(frozen=True)
class Load:
    """Expected traffic: requests a day and the average tokens of one request."""

    requests_per_day: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class BreakEven:
    serverless_monthly: Decimal | None  # None when no per-token price is in force
    dedicated_monthly: Decimal | None  # None when no dedicated price is in force
    # Requests a day above which dedicated is cheaper; None when either price is missing or a
    # request costs nothing per token.
    break_even_requests_per_day: int | None
    cheaper: str  # "serverless", "dedicated" or "" (cannot compare)


def serverless_cost_per_request(*, token_price, load: Load) -> Decimal:
    return (
        Decimal(load.input_tokens) * token_price.input_per_million
        + Decimal(load.output_tokens) * token_price.output_per_million
    ) / MILLION


def break_even(*, token_price, dedicated_per_hour: Decimal | None, replicas: int, load: Load):
    """Compare a month of serverless at `load` with `replicas` dedicated replicas."""
    serverless = dedicated = threshold = None
    if token_price is not None:
        per_request = serverless_cost_per_request(token_price=token_price, load=load)
        serverless = (per_request * load.requests_per_day * DAYS_PER_MONTH).quantize(
            CENT, ROUND_HALF_UP
        )
    if dedicated_per_hour is not None:
        dedicated = monthly_cost(dedicated_per_hour, replicas)
    if serverless is not None and dedicated is not None and per_request > 0:
        # The first whole number of requests a day at which dedicated is no dearer.
        threshold = math.ceil(dedicated / DAYS_PER_MONTH / per_request)
    if serverless is None or dedicated is None:
        cheaper = ""
    else:
        cheaper = "dedicated" if dedicated < serverless else "serverless"
    return BreakEven(serverless, dedicated, threshold, cheaper)
