"""Ingestion of the gateway's usage events into the ledger: rated, idempotent, never lost."""

from decimal import Decimal

import pytest
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import ImmutableRowError, PeriodSpend, UsageRecord, UsageRollup
from metering.models import UsageEvent
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import TokenPriceFactory

pytestmark = pytest.mark.django_db


def test_events_are_rated_with_the_price_in_force_when_they_finished(organization, version, price):
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("1"),
        output_per_million=Decimal("2"),
        effective_from=at(2026, 3, 10),
    )
    before = UsageEventFactory(
        organization=organization, model_version_id=version.pk, finished_at=at(2026, 3, 9, 23)
    )
    after = UsageEventFactory(
        organization=organization, model_version_id=version.pk, finished_at=at(2026, 3, 10)
    )
    assert usage_events_ingest(now=NOW) == 2
    old = UsageRecord.objects.get(request_id=before.request_id)
    new = UsageRecord.objects.get(request_id=after.request_id)
    # 1000 x 0.5 / 1M + 500 x 1.5 / 1M
    assert old.amount == Decimal("0.00125")
    assert old.token_price_id == price.pk
    assert new.amount == Decimal("0.002")
    assert old.period_start == new.period_start == at(2026, 3, 1)
    assert UsageEvent.objects.filter(ingested_at__isnull=True).count() == 0


def test_ingesting_twice_counts_once(organization, version, price):
    events = UsageEventFactory.create_batch(
        5, organization=organization, model_version_id=version.pk, finished_at=at(2026, 3, 2)
    )
    usage_events_ingest(now=NOW)
    # The gateway (or an operator) hands the same events over again.
    UsageEvent.objects.filter(pk__in=[e.pk for e in events]).update(ingested_at=None)
    assert usage_events_ingest(now=NOW) == 5
    assert UsageRecord.objects.count() == 5
    assert UsageRollup.objects.aggregate(n=Sum("requests"))["n"] == 5
    spend = PeriodSpend.objects.get(organization=organization)
    assert spend.amount == 5 * Decimal("0.00125")
    assert usage_events_ingest(now=NOW) == 0


def test_batches_take_the_backlog_in_pieces(organization, version, price):
    UsageEventFactory.create_batch(7, organization=organization, model_version_id=version.pk)
    assert usage_events_ingest(batch_size=3, now=NOW) == 3
    assert usage_events_ingest(batch_size=3, now=NOW) == 3
    assert usage_events_ingest(batch_size=3, now=NOW) == 1
    assert UsageRecord.objects.count() == 7


def test_usage_without_a_price_is_kept_and_not_charged(organization, version):
    event = UsageEventFactory(organization=organization, model_version_id=version.pk)
    UsageEventFactory(organization=organization, model_version_id=None)
    usage_events_ingest(now=NOW)
    record = UsageRecord.objects.get(request_id=event.request_id)
    assert record.token_price_id is None
    assert record.amount == 0
    assert record.input_tokens == 1000
    assert UsageRecord.objects.count() == 2


def test_a_price_in_another_currency_is_not_applied(organization, version, price):
    organization.currency = "EUR"
    organization.save()
    UsageEventFactory(organization=organization, model_version_id=version.pk)
    usage_events_ingest(now=NOW)
    record = UsageRecord.objects.get()
    assert (record.currency, record.amount, record.token_price_id) == ("EUR", 0, None)


def test_late_usage_of_a_closed_period_goes_to_the_open_one(organization, version, price):
    UsageEventFactory(
        organization=organization, model_version_id=version.pk, finished_at=at(2026, 2, 3)
    )
    usage_events_ingest(now=NOW)
    result = billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    assert len(result.created) == 1
    late = UsageEventFactory(
        organization=organization, model_version_id=version.pk, finished_at=at(2026, 2, 27)
    )
    usage_events_ingest(now=NOW)
    record = UsageRecord.objects.get(request_id=late.request_id)
    assert record.occurred_at == at(2026, 2, 27)
    assert record.period_start == at(2026, 3, 1)  # billed with March, not lost, not doubled


def test_ledger_rows_are_immutable(organization, version, price):
    UsageEventFactory(organization=organization, model_version_id=version.pk)
    usage_events_ingest(now=NOW)
    record = UsageRecord.objects.get()
    record.input_tokens = 1
    with pytest.raises(ImmutableRowError):
        record.save()
    with pytest.raises(ImmutableRowError):
        record.delete()
    with pytest.raises(ImmutableRowError):
        UsageRecord.objects.update(input_tokens=1)
    with pytest.raises(ImmutableRowError):
        UsageRecord.objects.all().delete()


def rollup_totals(**filters):
    rows = UsageRollup.objects.filter(**filters)
    sums = rows.aggregate(
        requests=Sum("requests"), input=Sum("input_tokens"), output=Sum("output_tokens")
    )
    amount = sum(
        (
            (
                r.input_tokens * r.input_price_per_million
                + r.output_tokens * r.output_price_per_million
            )
            / 1_000_000
            for r in rows
        ),
        Decimal(0),
    )
    return sums["requests"] or 0, sums["input"] or 0, sums["output"] or 0, amount


def ledger_totals(**filters):
    rows = UsageRecord.objects.filter(**filters)
    sums = rows.aggregate(input=Sum("input_tokens"), output=Sum("output_tokens"))
    amount = sum((r.amount for r in rows), Decimal(0))
    return rows.count(), sums["input"] or 0, sums["output"] or 0, amount


event_specs = st.lists(
    st.tuples(
        st.integers(0, 2),  # organization
        st.integers(0, 2),  # api key slot (0 = none)
        st.integers(0, 40_000),  # prompt tokens
        st.integers(0, 40_000),  # completion tokens
        st.integers(0, 60 * 24 * 20),  # minutes into March
        st.booleans(),  # priced model or not
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=event_specs, batch_size=st.integers(1, 10))
def test_rollups_always_equal_the_ledger(specs, batch_size, version, price, make_api_key):
    # Examples share the database, so the invariant is checked on the growing ledger.
    from tests.factories import OrganizationFactory

    orgs = [OrganizationFactory() for _ in range(3)]
    keys = [None] + [make_api_key(orgs[0])[0] for _ in range(2)]
    for org_index, key_index, prompt, completion, minutes, priced in specs:
        UsageEventFactory(
            organization=orgs[org_index],
            api_key=keys[key_index] if org_index == 0 else None,
            prompt_tokens=prompt,
            completion_tokens=completion,
            model_version_id=version.pk if priced else None,
            finished_at=at(2026, 3, 1) + minutes * (at(2026, 1, 1, 0, 1) - at(2026, 1, 1)),
        )
    while usage_events_ingest(batch_size=batch_size, now=NOW):
        pass
    assert rollup_totals() == ledger_totals()
    for org in orgs:
        assert rollup_totals(organization=org) == ledger_totals(organization=org)
        spend = PeriodSpend.objects.filter(organization=org).first()
        assert (spend.amount if spend else 0) == ledger_totals(organization=org)[3]
    for day in {r.occurred_at.date() for r in UsageRecord.objects.all()}:
        in_day = UsageRecord.objects.filter(
            occurred_at__gte=at(day.year, day.month, day.day),
            occurred_at__lt=at(day.year, day.month, day.day) + (at(2026, 1, 2) - at(2026, 1, 1)),
        )
        assert rollup_totals(day=day)[:3] == (
            in_day.count(),
            in_day.aggregate(s=Sum("input_tokens"))["s"],
            in_day.aggregate(s=Sum("output_tokens"))["s"],
        )


@pytest.mark.parametrize(
    ("input_price", "output_price"),
    [("0.123457", "7.654321"), ("0", "999.999999"), ("0.000001", "0.000001")],
)
def test_each_row_is_rated_exactly_as_rate_tokens_says(
    organization, version, input_price, output_price
):
    # PostgreSQL rates in SQL, SQLite in Python: both must agree with billing.rating.
    from billing.rating import rate_tokens

    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal(input_price),
        output_per_million=Decimal(output_price),
        effective_from=at(2026, 1, 1),
    )
    for prompt, completion in [(1, 1), (999_999, 3), (123_456_789, 987_654), (0, 0)]:
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            prompt_tokens=prompt,
            completion_tokens=completion,
            finished_at=at(2026, 3, 3),
        )
    usage_events_ingest(now=NOW)
    for record in UsageRecord.objects.all():
        assert record.amount == rate_tokens(
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            input_per_million=Decimal(input_price),
            output_per_million=Decimal(output_price),
        )


def test_the_database_refuses_changes_to_the_ledger_in_postgresql(organization, version, price):
    from django.db import DatabaseError, connection, transaction

    if connection.vendor != "postgresql":
        pytest.skip("the trigger exists on PostgreSQL only")
    UsageEventFactory(organization=organization, model_version_id=version.pk)
    usage_events_ingest(now=NOW)
    for statement in (
        "UPDATE billing_usagerecord SET input_tokens = 0",
        "DELETE FROM billing_usagerecord",
    ):
        with (
            pytest.raises(DatabaseError, match="immutable"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(statement)
    assert UsageRecord.objects.count() == 1


@pytest.mark.parametrize(
    ("kind", "period_start"),
    [("daily", at(2026, 3, 5)), ("weekly", at(2026, 3, 2)), ("monthly", at(2026, 3, 1))],
)
def test_rows_land_in_the_configured_period(organization, version, price, kind, period_start):
    from django.test import override_settings

    with override_settings(BILLING_PERIOD=kind):
        UsageEventFactory(
            organization=organization, model_version_id=version.pk, finished_at=at(2026, 3, 5, 18)
        )
        usage_events_ingest(now=at(2026, 3, 5, 19))
    assert UsageRecord.objects.get().period_start == period_start
    assert UsageRollup.objects.get().period_start == period_start
