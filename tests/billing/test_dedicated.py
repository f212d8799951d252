"""Dedicated GPU time: replica intervals cut into per-day segments, billed by the second."""

import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.invoicing import billing_period_close
from billing.ledger import replica_usage_ingest
from billing.models import DedicatedUsageRecord, PeriodSpend
from catalog.selectors import dedicated_price_at
from deployments.models import ReplicaUsage
from tests.billing.conftest import NOW, at
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelVersionFactory,
)
from tests.deployments.factories import DeploymentFactory, ReplicaUsageFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def deployment(organization):
    profile = HardwareProfileFactory(gpu_count=2, price_per_hour=Decimal("9.0000"))
    deployment = DeploymentFactory(organization=organization, hardware_profile=profile)
    DedicatedPriceFactory(
        model_version=deployment.model_version,
        hardware_profile=profile,
        per_hour=Decimal("7.2000"),
        effective_from=at(2026, 1, 1),
    )
    return deployment


def test_an_interval_across_midnight_is_split_and_billed_by_the_second(deployment):
    usage = ReplicaUsageFactory(
        deployment=deployment,
        started_at=at(2026, 2, 27, 23, 30, 0, 250_000),
        ended_at=at(2026, 3, 1, 0, 10, 0, 1),
    )
    replica_usage_ingest(now=NOW)
    segments = list(DedicatedUsageRecord.objects.order_by("start"))
    assert [(s.start, s.end, s.seconds) for s in segments] == [
        (at(2026, 2, 27, 23, 30), at(2026, 2, 28), 1800),
        (at(2026, 2, 28), at(2026, 3, 1), 86_400),
        (at(2026, 3, 1), at(2026, 3, 1, 0, 10, 1), 601),  # a started second is billed
    ]
    assert [s.period_start for s in segments] == [at(2026, 2, 1)] * 2 + [at(2026, 3, 1)]
    assert {s.replica_usage_id for s in segments} == {usage.pk}
    assert replica_usage_ingest(now=NOW) == 0  # nothing twice

    [invoice] = billing_period_close(period_start=at(2026, 2, 1), now=NOW).created
    [line] = invoice.lines.all()
    assert line.kind == "dedicated"
    assert line.ledger_quantity == 88_200
    assert line.unit == "GPU hour"
    assert line.quantity == Decimal("49.000000")  # 88200 s x 2 GPUs
    assert line.unit_price == Decimal("3.6")
    assert line.amount == Decimal("176.40")  # 88200 / 3600 x 7.20
    assert deployment.name in line.description


def test_a_running_replica_is_billed_hour_by_hour_then_to_its_end(deployment):
    usage = ReplicaUsageFactory(
        deployment=deployment, started_at=at(2026, 3, 15, 9, 20), ended_at=None
    )
    replica_usage_ingest(now=at(2026, 3, 15, 11, 5))
    assert DedicatedUsageRecord.objects.aggregate(s=Sum("seconds"))["s"] == 100 * 60
    replica_usage_ingest(now=at(2026, 3, 15, 11, 59))
    assert DedicatedUsageRecord.objects.count() == 1
    usage.ended_at = at(2026, 3, 15, 12, 0, 30)
    usage.save()
    replica_usage_ingest(now=at(2026, 3, 15, 12, 1))
    assert DedicatedUsageRecord.objects.aggregate(s=Sum("seconds"))["s"] == 160 * 60 + 30
    spend = PeriodSpend.objects.get()
    assert spend.amount == Decimal("7.2") * (160 * 60 + 30) / 3600


def test_a_price_change_splits_the_segment(deployment):
    DedicatedPriceFactory(
        model_version=deployment.model_version,
        hardware_profile=deployment.hardware_profile,
        per_hour=Decimal("3.6000"),
        effective_from=at(2026, 2, 10, 12),
    )
    ReplicaUsageFactory(
        deployment=deployment, started_at=at(2026, 2, 10, 11), ended_at=at(2026, 2, 10, 13)
    )
    replica_usage_ingest(now=NOW)
    assert [
        (s.seconds, s.price_per_hour) for s in DedicatedUsageRecord.objects.order_by("start")
    ] == [(3600, Decimal("7.2")), (3600, Decimal("3.6"))]


def test_without_a_dedicated_price_the_profile_list_price_applies(organization):
    profile = HardwareProfileFactory(gpu_count=1, price_per_hour=Decimal("2.0000"))
    deployment = DeploymentFactory(organization=organization, hardware_profile=profile)
    ReplicaUsageFactory(
        deployment=deployment, started_at=at(2026, 2, 1), ended_at=at(2026, 2, 1, 1)
    )
    replica_usage_ingest(now=NOW)
    segment = DedicatedUsageRecord.objects.get()
    assert (segment.price_per_hour, segment.dedicated_price_id) == (Decimal(2), None)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start_offset=st.integers(0, 40 * 86_400),
    length=st.integers(0, 5 * 86_400),
    micro=st.integers(0, 999_999),
    ticks=st.lists(st.integers(0, 6 * 86_400), max_size=5),
)
def test_segments_always_add_up_to_the_interval(deployment, start_offset, length, micro, ticks):
    started = at(2026, 1, 1) + timedelta(seconds=start_offset, microseconds=micro)
    ended = started + timedelta(seconds=length)
    usage = ReplicaUsageFactory(deployment=deployment, started_at=started, ended_at=None)
    for tick in sorted(ticks):  # ingestion runs while the replica is up
        moment = started + timedelta(seconds=tick)
        if moment < ended:
            replica_usage_ingest(now=moment)
    usage.ended_at = ended
    usage.save()
    replica_usage_ingest(now=ended + timedelta(hours=1))
    segments = DedicatedUsageRecord.objects.filter(replica_usage_id=usage.pk).order_by("start")
    floor = started.replace(microsecond=0)
    ceil = ended if ended.microsecond == 0 else ended.replace(microsecond=0) + timedelta(seconds=1)
    assert sum(s.seconds for s in segments) == int((ceil - floor).total_seconds())
    edges = [(s.start, s.end) for s in segments]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    assert all(s.start.date() == (s.end - timedelta(microseconds=1)).date() for s in segments)


def test_dedicated_time_shows_in_the_usage_report(deployment):
    from billing.usage import usage_report

    ReplicaUsageFactory(
        deployment=deployment, started_at=at(2026, 2, 10, 10), ended_at=at(2026, 2, 10, 10, 30)
    )
    replica_usage_ingest(now=NOW)
    [row] = usage_report(
        organization=deployment.organization,
        start=at(2026, 2, 1).date(),
        end=at(2026, 2, 28).date(),
        group_by="deployment",
    )
    assert (row.key, row.label, row.gpu_seconds) == (str(deployment.pk), deployment.name, 1800)
    assert row.amount == Decimal("3.6")  # half an hour at 7.20 per replica-hour
    [by_day] = usage_report(
        organization=deployment.organization,
        start=at(2026, 2, 10).date(),
        end=at(2026, 2, 10).date(),
        group_by="day",
    )
    assert (by_day.key, by_day.gpu_seconds) == ("2026-02-10", 1800)


def test_a_running_replica_keeps_its_version_after_the_deployment_moves_on(deployment):
    """Hours cut after the deployment was updated are still the version the replica ran."""
    old = deployment.model_version
    newer = ModelVersionFactory(model=old.model)
    DedicatedPriceFactory(
        model_version=newer,
        hardware_profile=deployment.hardware_profile,
        per_hour=Decimal("9.0000"),
        effective_from=at(2026, 1, 1),
    )
    usage = ReplicaUsageFactory(deployment=deployment, started_at=at(2026, 2, 10, 8), ended_at=None)
    replica_usage_ingest(now=at(2026, 2, 10, 10, 30))
    deployment.model_version = newer
    deployment.save()
    usage.ended_at = at(2026, 2, 10, 12, 0, 0, 1)
    usage.save()
    replica_usage_ingest(now=NOW)
    assert [
        (s.model_version_id, s.seconds, s.price_per_hour)
        for s in DedicatedUsageRecord.objects.order_by("start")
    ] == [(old.pk, 2 * 3600, Decimal("7.2")), (old.pk, 2 * 3600 + 1, Decimal("7.2"))]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    intervals=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 20 * 86_400), st.integers(0, 3 * 86_400)),
        min_size=1,
        max_size=4,
    ),
    price_changes=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 24 * 86_400), st.integers(1, 20_000)),
        max_size=4,
        unique_by=lambda change: change[:2],
    ),
)
def test_every_segment_is_priced_for_its_own_version(organization, intervals, price_changes):
    """Replicas of two versions of one deployment, prices of both changing at random: each
    segment has the price dedicated_price_at gives for its replica's version at its start,
    never across a price change, and each version's seconds add up to its replicas'."""
    # Examples share the database: a fresh profile keeps each example's prices its own.
    profile = HardwareProfileFactory()
    deployment = DeploymentFactory(
        organization=organization, hardware_profile=profile, priced=False
    )
    versions = [deployment.model_version, ModelVersionFactory(model=deployment.model_version.model)]
    for version, per_hour in zip(versions, ("7.2000", "9.0000"), strict=True):
        DedicatedPriceFactory(
            model_version=version,
            hardware_profile=profile,
            per_hour=Decimal(per_hour),
            effective_from=at(2026, 1, 1),
        )
    for index, offset, cents in price_changes:
        DedicatedPriceFactory(
            model_version=versions[index],
            hardware_profile=profile,
            per_hour=Decimal(cents) / 100,
            effective_from=at(2026, 2, 1) + timedelta(seconds=offset),
        )
    usages = [
        ReplicaUsageFactory(
            deployment=deployment,
            model_version=versions[index],
            started_at=at(2026, 2, 1) + timedelta(seconds=start),
            ended_at=at(2026, 2, 1) + timedelta(seconds=start + length),
        )
        for index, start, length in intervals
    ]
    replica_usage_ingest(now=NOW)
    segments = DedicatedUsageRecord.objects.filter(deployment_id=deployment.pk)
    by_usage = {usage.pk: usage for usage in usages}
    for segment in segments:
        version = by_usage[segment.replica_usage_id].model_version
        assert segment.model_version_id == version.pk
        price = dedicated_price_at(version=version, profile=profile, at=segment.start)
        assert (segment.dedicated_price_id, segment.price_per_hour) == (price.pk, price.per_hour)
        last_second = segment.end - timedelta(seconds=1)
        assert dedicated_price_at(version=version, profile=profile, at=last_second) == price
    for version in versions:
        billed = sum(s.seconds for s in segments if s.model_version_id == version.pk)
        ran = sum(int(u.seconds()) for u in usages if u.model_version == version)
        assert billed == ran


def _reconcile_output(period: str) -> tuple[bool, str]:
    from io import StringIO

    from django.core.management import CommandError, call_command

    out = StringIO()
    try:
        call_command("billing_reconcile", "--period", period, "--no-stripe", stdout=out)
    except CommandError:
        return False, out.getvalue()
    return True, out.getvalue()


def test_billing_reconcile_proves_a_restart_is_a_gap_billed_as_it_ran(deployment):
    """Two runs of one replica (stopped 45 s, then started again): billed as they ran."""
    first = ReplicaUsageFactory(
        deployment=deployment,
        replica_name="chat-000",
        started_at=at(2026, 2, 10, 9, 0, 0, 400_000),
        ended_at=at(2026, 2, 10, 9, 10, 0, 200_000),
    )
    ReplicaUsageFactory(
        deployment=deployment,
        replica_name="chat-000",
        started_at=first.ended_at + timedelta(seconds=45),
        ended_at=at(2026, 2, 10, 10),
    )
    replica_usage_ingest(now=NOW)
    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    total = DedicatedUsageRecord.objects.aggregate(seconds=Sum("seconds"))["seconds"]
    assert total == 601 + 2955  # each run's started second and ended second, not the gap
    agree, out = _reconcile_output("2026-02")
    assert agree, out


def test_billing_reconcile_reports_overlapping_runs_and_a_ledger_that_differs(deployment):
    first = ReplicaUsageFactory(
        deployment=deployment,
        replica_name="chat-000",
        started_at=at(2026, 2, 10, 9),
        ended_at=at(2026, 2, 10, 10),
    )
    ReplicaUsageFactory(
        deployment=deployment,
        replica_name="chat-000",
        started_at=at(2026, 2, 10, 9, 30),  # while the first run still ran
        ended_at=at(2026, 2, 10, 11),
    )
    replica_usage_ingest(now=NOW)
    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    # The run's end changed after it was billed (the ledger is append-only; the run is not).
    ReplicaUsage.objects.filter(pk=first.pk).update(ended_at=at(2026, 2, 10, 10, 0, 5))
    agree, out = _reconcile_output("2026-02")
    assert not agree
    assert f"overlaps run {first.pk}" in out and "GPU time billed twice" in out
    assert f"run {first.pk} ran 3605 s" in out and "the ledger bills 3600 s" in out
