"""GPU time per model version: during a rolling update the old replicas keep running (and are
billed as) the old version. From the emulated cluster through the reconciler's ReplicaUsage
rows to the ledger, the invoice and billing_reconcile."""

import logging
from datetime import datetime
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts.actors import Actor
from billing.invoicing import billing_period_close
from billing.ledger import replica_usage_ingest
from billing.models import DedicatedUsageRecord
from catalog.selectors import dedicated_price_at
from deployments import services
from deployments.models import Deployment, ReplicaUsage
from deployments.reconciler import reconcile
from tests.billing.conftest import NOW, at
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.kube import PODS

pytestmark = pytest.mark.django_db

# Per replica-hour on h100-80gb-x2 (2 GPUs): 3.60 and 4.50 per GPU-hour.
V1_PER_HOUR = Decimal("7.2000")
V2_PER_HOUR = Decimal("9.0000")


class Clock:
    """The control plane's and the cluster's clock, moved by the test: GPU time is stamped with
    the kubelet's container start and finish times, which it writes."""

    def __init__(self, moment: datetime):
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture
def clock(monkeypatch, cluster):
    clock = Clock(at(2026, 2, 10, 8))
    monkeypatch.setattr(timezone, "now", clock)
    cluster.cluster.clock = clock  # the kubelet's container timestamps agree with it
    return clock


@pytest.fixture
def versions(db):
    """mixtral 0.1 and 0.2, each with its own price on h100-80gb-x2 since January."""
    model = ModelFactory(slug="mixtral-8x7b-instruct", moe=True)
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    found = []
    for number, per_hour in (("0.1", V1_PER_HOUR), ("0.2", V2_PER_HOUR)):
        version = ModelVersionFactory(
            model=model,
            version=number,
            artifact_uri=f"s3://sirocco-models/mixtral-8x7b-instruct/{number}",
            size_bytes=93_400_000_000,
        )
        DedicatedPriceFactory(
            model_version=version,
            hardware_profile=profile,
            per_hour=per_hour,
            effective_from=at(2026, 1, 1),
        )
        found.append(version)
    return found


def deploy(organization, **fields) -> Deployment:
    return services.deployment_create(
        actor=Actor.system(organization),
        name="chat",
        model="mixtral-8x7b-instruct",
        version="0.1",
        hardware_profile="h100-80gb-x2",
        **fields,
    )


def update_version(deployment, version: str) -> Deployment:
    return services.deployment_update(
        actor=Actor.system(deployment.organization), deployment=deployment, version=version
    )


def passes(deployment, cluster, *, until=None, limit=30) -> None:
    """Reconcile and let the cluster's control loop run, until converged or `until()`."""
    for _ in range(limit):
        requeue = reconcile(deployment.pk)
        if until is not None and until():
            return
        if until is None and requeue is None:
            return
        cluster.tick()
    pytest.fail("the deployment did not get there")


def rows(deployment) -> list[tuple]:
    return list(
        ReplicaUsage.objects.filter(deployment=deployment)
        .order_by("started_at", "id")
        .values_list("model_version__version", "started_at", "ended_at")
    )


def test_a_rolling_update_mid_day_is_charged_at_each_versions_price_for_its_own_seconds(
    organization, versions, kube, cluster, clock
):
    v1, v2 = versions
    t0 = at(2026, 2, 10, 8)  # deployed
    t1 = at(2026, 2, 10, 12)  # updated to 0.2: its surge replica takes two GPUs
    t2 = at(2026, 2, 10, 12, 3, 20)  # 0.2 is ready: the 0.1 replica lets go
    t3 = at(2026, 2, 10, 18)  # deleted

    clock.moment = t0
    deployment = deploy(organization)
    passes(deployment, cluster)
    assert rows(deployment) == [("0.1", t0, None)]

    clock.moment = t1
    deployment = update_version(deployment, "0.2")
    passes(deployment, cluster, until=lambda: len(rows(deployment)) == 2)
    # Both run now (maxSurge 1, maxUnavailable 0), each as the version it was started with.
    assert rows(deployment) == [("0.1", t0, None), ("0.2", t1, None)]

    clock.moment = t2
    passes(deployment, cluster)
    deployment.refresh_from_db()
    assert (deployment.status, deployment.model_version) == ("ready", v2)
    assert rows(deployment) == [("0.1", t0, t2), ("0.2", t1, None)]

    clock.moment = t3
    services.deployment_delete(actor=Actor.system(organization), deployment=deployment)
    passes(deployment, cluster)
    assert rows(deployment) == [("0.1", t0, t2), ("0.2", t1, t3)]

    clock.moment = NOW
    replica_usage_ingest(now=NOW)
    segments = list(DedicatedUsageRecord.objects.order_by("start"))
    profile = deployment.hardware_profile
    assert [(s.model_version_id, s.start, s.end, s.seconds) for s in segments] == [
        (v1.pk, t0, t2, 4 * 3600 + 200),
        (v2.pk, t1, t3, 6 * 3600),
    ]
    for segment, version in zip(segments, versions, strict=True):
        price = dedicated_price_at(version=version, profile=profile, at=segment.start)
        assert (segment.dedicated_price_id, segment.price_per_hour) == (price.pk, price.per_hour)

    [invoice] = billing_period_close(period_start=at(2026, 2, 1), now=NOW).created
    lines = [
        (line.description, line.ledger_quantity, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.filter(kind="dedicated").order_by("position")
    ]
    assert lines == [
        (
            "Dedicated deployment chat (mixtral-8x7b-instruct:0.1 on h100-80gb-x2)",
            14_600,
            Decimal("8.111111"),  # GPU hours: 14,600 s x 2 GPUs
            Decimal("3.6"),
            Decimal("29.20"),  # 14,600 s at 7.20 per replica-hour
        ),
        (
            "Dedicated deployment chat (mixtral-8x7b-instruct:0.2 on h100-80gb-x2)",
            21_600,
            Decimal("12.000000"),
            Decimal("4.5"),
            Decimal("54.00"),  # 6 hours at 9.00
        ),
    ]
    out = StringIO()
    call_command("billing_reconcile", "--period", "2026-02", stdout=out)  # raises on a difference
    assert "agree" in out.getvalue()


def test_replicas_first_seen_after_an_update_are_recorded_as_the_version_they_run(
    organization, versions, kube, cluster, clock
):
    """The customer changes the version before the reconciler saw the first replicas take
    their GPUs: those replicas still run (and are billed as) 0.1."""
    deployment = deploy(organization, min_replicas=2, max_replicas=2)
    reconcile(deployment.pk)  # applies 0.1
    cluster.tick(4)  # its pods are created and their servers run, unseen by the reconciler
    deployment = update_version(deployment, "0.2")
    reconcile(deployment.pk)
    assert [version for version, *_ in rows(deployment)] == ["0.1", "0.1"]
    passes(deployment, cluster)
    usage = ReplicaUsage.objects.filter(deployment=deployment)
    assert {u.model_version.version for u in usage.filter(ended_at=None)} == {"0.2"}
    assert {u.model_version.version for u in usage.exclude(ended_at=None)} == {"0.1"}


def test_a_replica_that_does_not_say_its_version_is_told_by_its_revision(
    organization, versions, kube, cluster, clock, caplog
):
    """Pods made without the model annotation (not by this code): one of the current revision
    runs the deployment's spec; of another revision, its version is not known, so it is
    recorded as the deployment's current one, with a warning."""
    deployment = deploy(organization)
    reconcile(deployment.pk)
    cluster.tick(4)  # the server runs
    namespace = f"sirocco-{organization.slug}"

    def strip_annotations():
        for pod in cluster.cluster.list_objects("pods"):
            pod = {**pod, "metadata": {**pod["metadata"]}}
            pod["metadata"].pop("annotations", None)
            cluster.cluster._put(PODS, namespace, pod["metadata"]["name"], pod)

    cluster.call(strip_annotations)
    with caplog.at_level(logging.WARNING, logger="deployments.reconciler"):
        reconcile(deployment.pk)
    assert [version for version, *_ in rows(deployment)] == ["0.1"]
    assert not caplog.records

    ReplicaUsage.objects.filter(deployment=deployment).update(ended_at=timezone.now())
    deployment = update_version(deployment, "0.2")
    with caplog.at_level(logging.WARNING, logger="deployments.reconciler"):
        reconcile(deployment.pk)  # the 0.1 pod, now of an old revision, opens a row again
    assert [version for version, *_ in rows(deployment)] == ["0.1", "0.2"]
    assert "cannot tell which model version it runs (it does not say)" in caplog.text
