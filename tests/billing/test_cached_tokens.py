"""Cached prompt tokens (usage.prompt_tokens_details.cached_tokens) at the cached-input price:
effective-dated per model version, rated on the ledger (both ingestion paths: Python on SQLite,
SQL on PostgreSQL), their own invoice line, in the usage report, and reconciled."""

from datetime import date
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command

from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import Invoice, InvoiceLine, UsageRecord
from billing.rating import rate_tokens
from billing.usage import usage_report
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import TokenPriceFactory

pytestmark = pytest.mark.django_db


def test_rating_takes_cached_tokens_at_their_price():
    rated = rate_tokens(
        input_tokens=1_000_000,
        output_tokens=0,
        input_per_million=Decimal("0.5"),
        output_per_million=Decimal("1.5"),
        cached_tokens=600_000,
        cached_input_per_million=Decimal("0.125"),
    )
    assert rated == Decimal("0.4") * Decimal("0.5") + Decimal("0.6") * Decimal("0.125")
    # No cached price: cached tokens cost the input price; never more cached than input.
    assert rate_tokens(
        input_tokens=10,
        output_tokens=0,
        input_per_million=Decimal(1),
        output_per_million=Decimal(0),
        cached_tokens=10,
    ) == Decimal("0.00001")
    assert rate_tokens(
        input_tokens=10,
        output_tokens=0,
        input_per_million=Decimal(1),
        output_per_million=Decimal(0),
        cached_tokens=50,
        cached_input_per_million=Decimal(0),
    ) == Decimal(0)


def test_cached_tokens_are_billed_at_the_cached_price_in_force_and_reconciled(
    organization, version, price
):
    # January's price (the fixture, $0.50 in) has no cached price; from Feb 10 cached input
    # costs $0.125 per 1M (75 % off $0.50).
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        cached_input_per_million=Decimal("0.125000"),
        output_per_million=Decimal("1.500000"),
        effective_from=at(2026, 2, 10),
    )
    before = UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=at(2026, 2, 3),
        prompt_tokens=1_000_000,
        completion_tokens=0,
        cached_tokens=800_000,
    )
    after = [
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            finished_at=at(2026, 2, 12, hour),
            prompt_tokens=1_000_000,
            completion_tokens=200_000,
            cached_tokens=750_000,
        )
        for hour in (1, 2)
    ]
    usage_events_ingest(now=NOW)

    old = UsageRecord.objects.get(request_id=before.request_id)
    assert old.cached_input_price_per_million is None
    assert old.amount == Decimal("0.5")  # cached tokens at the input price
    new = UsageRecord.objects.get(request_id=after[0].request_id)
    assert new.cached_input_price_per_million == Decimal("0.125")
    # 250k x 0.50 + 750k x 0.125 + 200k x 1.50, per 1M
    assert new.amount == Decimal("0.125") + Decimal("0.09375") + Decimal("0.3")

    report = usage_report(
        organization=organization, start=date(2026, 2, 1), end=date(2026, 2, 28), group_by="day"
    )
    by_day = {row.key: row for row in report}
    assert by_day["2026-02-12"].cached_tokens == 1_500_000
    assert by_day["2026-02-12"].amount == 2 * new.amount
    assert by_day["2026-02-03"].amount == Decimal("0.5")

    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    invoice = Invoice.objects.get(organization=organization)
    lines = {
        (line.kind, line.unit_price): line
        for line in invoice.lines.all()
        if line.kind in InvoiceLine.USAGE_KINDS
    }
    cached = lines[(InvoiceLine.Kind.CACHED_INPUT_TOKENS, Decimal("0.125"))]
    assert cached.ledger_quantity == 1_500_000
    assert cached.amount == Decimal("0.19")  # 0.1875 rounded half-up
    # One input line at $0.50: the January-priced request whole (1M, its cached tokens at the
    # input price then) and the uncached rest after Feb 10 (2 x 250k).
    inputs = [line for (kind, _), line in lines.items() if kind == InvoiceLine.Kind.INPUT_TOKENS]
    assert [line.ledger_quantity for line in inputs] == [1_500_000]
    assert invoice.subtotal == sum(
        (line.amount for line in invoice.lines.all() if line.kind in InvoiceLine.USAGE_KINDS),
        Decimal(0),
    )
    assert "cached input tokens" in cached.description

    out = StringIO()
    call_command("billing_reconcile", "--period", "2026-02", stdout=out)
    assert "agree" in out.getvalue(), out.getvalue()


def test_a_cached_price_is_set_over_rest_and_never_over_the_input_price(version):
    from rest_framework.test import APIClient

    from tests.factories import UserFactory

    operator = APIClient()
    operator.force_login(UserFactory(is_staff=True))
    url = f"/api/v1/models/{version.model.slug}/versions/{version.version}/token-prices"
    refused = operator.post(
        url,
        {"input_per_million": "1", "output_per_million": "2", "cached_input_per_million": "1.5"},
        format="json",
    )
    assert refused.status_code == 400, refused.content
    assert "cached_input_per_million" in str(refused.json())
    created = operator.post(
        url,
        {"input_per_million": "1", "output_per_million": "2", "cached_input_per_million": "0.1"},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["cached_input_per_million"] == "0.100000"
    listed = operator.get(url).json()
    prices = listed["results"] if isinstance(listed, dict) else listed
    assert {p["cached_input_per_million"] for p in prices} == {"0.100000"}


def test_under_a_private_offer_cached_tokens_never_cost_more_than_its_input_price(
    organization, version, operator_actor
):
    # List: $1 in, $0.40 cached; an offer at 90 % off makes input $0.10, so cached tokens cost
    # $0.10 too (the list's cached price is over it), never more than uncached ones.
    from datetime import timedelta

    from django.utils import timezone

    from catalog.offers import private_offer_create

    start = timezone.now() + timedelta(seconds=1)
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("1.000000"),
        cached_input_per_million=Decimal("0.400000"),
        output_per_million=Decimal("2.000000"),
        effective_from=start - timedelta(days=1),
    )
    private_offer_create(
        actor=operator_actor,
        organization=organization,
        version=version,
        discount_percent=Decimal("90"),
        starts_at=start,
        expires_at=start + timedelta(days=30),
    )
    event = UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=start + timedelta(minutes=1),
        prompt_tokens=1_000_000,
        completion_tokens=0,
        cached_tokens=500_000,
    )
    usage_events_ingest(now=start + timedelta(minutes=2))
    record = UsageRecord.objects.get(request_id=event.request_id)
    assert record.input_price_per_million == Decimal("0.1")
    assert record.cached_input_price_per_million == Decimal("0.1")
    assert record.amount == Decimal("0.1")
