from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from catalog.models import TokenPrice
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory

# A fixed clock for billing tests: mid-March 2026, so February is a closed-able period.
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def now():
    return NOW


@pytest.fixture
def version(db):
    return ModelVersionFactory()


@pytest.fixture
def price(version) -> TokenPrice:
    """$0.50 in / $1.50 out per 1M tokens, in force since 2026-01-01."""
    return TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    )


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def days(n) -> timedelta:
    return timedelta(days=n)
