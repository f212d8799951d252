"""The reconciler end to end on the kubernetes provisioner: status, progress, events, replicas,
GPU time, faults, deletion, the drift sweep and the autoscaler."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.actors import Actor
from deployments import services
from deployments.autoscaler import autoscale
from deployments.models import Deployment, DeploymentEvent, LoadReport, ReplicaUsage
from deployments.reconciler import CHAIN_LATE_SECONDS, find_orphans, reconcile, stalled, sweep
from deployments.selectors import route_for
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.factories import ServerlessDeploymentFactory, ServerlessPoolFactory
from tests.deployments.kube import Fault, Resource

pytestmark = pytest.mark.django_db


class WorkerKilled(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


@pytest.fixture
def mixtral(db):
    version = ModelVersionFactory(
        model=ModelFactory(slug="mixtral-8x7b-instruct", moe=True),
        version="0.1",
        artifact_uri="s3://sirocco-models/mixtral-8x7b-instruct/0.1",
        size_bytes=93_400_000_000,
    )
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    DedicatedPriceFactory(model_version=version, hardware_profile=profile)
    return version


def deploy(organization, **fields):
    defaults = {
        "name": "chat",
        "model": "mixtral-8x7b-instruct",
        "hardware_profile": "h100-80gb-x2",
    }
    return services.deployment_create(actor=Actor.system(organization), **{**defaults, **fields})


def converge(deployment, cluster, *, passes=25) -> Deployment:
    for _ in range(passes):
        if reconcile(deployment.pk) is None:
            break
        cluster.tick()
    else:
        pytest.fail("did not converge")
    deployment.refresh_from_db()
    return deployment


def writes(cluster) -> list:
    return [call for call in cluster.cluster.calls if call[0] in ("patch", "create", "delete")]


def test_a_deployment_becomes_ready_with_progress_events_endpoints_and_gpu_time(
    organization, mixtral, kube, cluster
):
    deployment = deploy(organization, min_replicas=2, max_replicas=2)
    seen = []
    for _ in range(20):
        requeue = reconcile(deployment.pk)
        deployment.refresh_from_db()
        seen.append((deployment.status, deployment.progress_phase, deployment.progress_percent))
        if requeue is None:
            break
        assert requeue == kube.poll_interval
        cluster.tick()
    assert (deployment.status, deployment.progress_phase, deployment.progress_percent) == (
        "ready",
        "ready",
        100,
    )
    phases = [phase for _status, phase, _ in seen]
    for phase in ("scheduling", "pulling_image", "loading_weights", "ready"):
        assert phase in phases
    assert seen[0][0] == "provisioning"
    percents = [percent for *_, percent in seen]
    assert percents == sorted(percents)
    assert deployment.observed_generation == deployment.generation
    assert {c["type"]: c["status"] for c in deployment.conditions} == {
        "Available": "True",
        "Progressing": "True",
    }
    assert list(deployment.events.values_list("reason", flat=True).reverse()) == [
        "Created",
        "Provisioning",
        "Ready",
    ]
    replicas = list(deployment.replicas.all())
    assert len(replicas) == 2 and all(r.ready and r.endpoint.endswith(":8000") for r in replicas)
    route = route_for(organization_id=organization.pk, model="chat")
    assert sorted(route.replicas) == sorted((r.name, r.endpoint) for r in replicas)
    usage = ReplicaUsage.objects.filter(deployment=deployment)
    assert usage.count() == 2 and all(u.ended_at is None for u in usage)
    assert {u.hardware_profile.name for u in usage} == {"h100-80gb-x2"}


def test_reconciling_a_converged_deployment_writes_nothing(organization, mixtral, kube, cluster):
    deployment = converge(deploy(organization), cluster)
    k8s_writes = len(writes(cluster))
    with CaptureQueriesContext(connection) as queries:
        assert reconcile(deployment.pk) is None
        assert reconcile(deployment.pk) is None
    assert len(writes(cluster)) == k8s_writes
    changed = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith(("INSERT", "DELETE"))
        or (q["sql"].startswith("UPDATE") and "lease_token" not in q["sql"])
    ]
    assert changed == []  # only the lease is taken and given back
    assert deployment.events.count() == 3


@pytest.mark.parametrize("kill_at", ["sync", "record"])
def test_a_worker_killed_mid_reconcile_converges_when_run_again(
    organization, mixtral, kube, cluster, kill_at, monkeypatch
):
    deployment = deploy(organization)
    import deployments.reconciler as reconciler

    original = reconciler._record_observation if kill_at == "record" else kube.sync

    def killed(*args, **kwargs):
        original(*args, **kwargs)  # the work happened, then the process died
        raise WorkerKilled

    if kill_at == "record":
        monkeypatch.setattr(reconciler, "_record_observation", killed)
    else:
        monkeypatch.setattr(kube, "sync", killed)
    with pytest.raises(WorkerKilled):
        reconcile(deployment.pk)
    monkeypatch.undo()
    deployment = converge(deployment, cluster)
    assert deployment.status == "ready"
    assert deployment.replicas.count() == 1
    assert ReplicaUsage.objects.filter(deployment=deployment, ended_at=None).count() == 1


def test_a_lease_keeps_two_passes_apart_and_expires(organization, mixtral, kube, cluster):
    deployment = deploy(organization)
    Deployment.objects.filter(pk=deployment.pk).update(
        lease_token="someone", lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    assert reconcile(deployment.pk) is None
    assert writes(cluster) == []  # the other pass holds it
    assert sweep() == ([], [])  # and the sweep leaves it alone
    Deployment.objects.filter(pk=deployment.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert sweep() == ([], [])  # its chain's next pass is not late yet
    Deployment.objects.filter(pk=deployment.pk).update(
        next_reconcile_at=timezone.now() - timedelta(seconds=CHAIN_LATE_SECONDS + 1)
    )
    assert sweep() == ([str(deployment.pk)], [])  # a killed worker's lease ran out
    assert stalled() == [str(deployment.pk)]
    assert converge(deployment, cluster).status == "ready"


def test_transient_api_errors_back_off_then_converge(organization, mixtral, kube, cluster):
    deployment = deploy(organization)
    cluster.cluster.faults.append(Fault("patch", "*", status=500, times=2))
    first = reconcile(deployment.pk)
    second = reconcile(deployment.pk)
    assert 1.5 <= first <= 2.5 and 3 <= second <= 5  # exponential, with jitter
    deployment.refresh_from_db()
    assert deployment.reconcile_failures == 2
    assert "Retrying after an error from the cluster" in deployment.status_reason
    assert deployment.events.filter(reason="ClusterError").count() == 1
    deployment = converge(deployment, cluster)
    assert (deployment.status, deployment.reconcile_failures) == ("ready", 0)


def test_an_unreachable_cluster_eventually_fails_the_deployment(
    organization, mixtral, kube, cluster
):
    deployment = deploy(organization)
    cluster.cluster.faults.append(Fault("*", "*", status=503, times=100))
    for _ in range(10):
        reconcile(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == "failed"
    assert deployment.status_reason.startswith("The cluster kept failing for 10 attempts")


def test_a_crash_looping_model_fails_and_releases_its_gpus(organization, mixtral, kube, cluster):
    cluster.cluster.pod_faults["chat"] = "oom"
    deployment = converge(deploy(organization), cluster)
    assert deployment.status == "failed"
    assert "ran out of memory (OOMKilled; limit 128Gi)" in deployment.status_reason
    assert deployment.events.filter(type="Warning", reason="OOMKilled").exists()
    assert cluster.cluster.list_objects("pods") == []  # scaled to zero: no GPU held
    assert not ReplicaUsage.objects.filter(deployment=deployment, ended_at=None).exists()
    assert deployment.replicas.count() == 0

    # The customer fixes it (here: the fault goes away) and changes the deployment: a retry.
    cluster.cluster.pod_faults.clear()
    deployment = services.deployment_update(
        actor=Actor.system(organization), deployment=deployment, max_replicas=2
    )
    assert deployment.status == "provisioning"
    assert converge(deployment, cluster).status == "ready"


def test_waiting_for_gpus_is_explained_then_fails_at_the_deadline(
    organization, mixtral, kube, cluster
):
    organization.max_gpus = 64
    organization.save()
    cluster.cluster.nodes = cluster.cluster.nodes[:1]  # one node, 8 GPUs
    deployment = deploy(organization, min_replicas=5, max_replicas=5)
    for _ in range(4):
        reconcile(deployment.pk)
        cluster.tick()
    reconcile(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == "provisioning"
    assert "Insufficient nvidia.com/gpu" in deployment.status_reason
    assert deployment.events.filter(reason="Unschedulable", type="Warning").count() == 1
    cluster.cluster.past_deadline.add("chat")
    deployment = converge(deployment, cluster)
    assert deployment.status == "failed"
    assert deployment.status_reason.startswith("No node can run this replica yet (2 × NVIDIA")


def test_a_new_version_rolls_out_and_status_says_updating(organization, mixtral, kube, cluster):
    deployment = converge(deploy(organization), cluster)
    newer = ModelVersionFactory(
        model=mixtral.model, version="0.2", artifact_uri="s3://sirocco-models/mixtral/0.2"
    )
    DedicatedPriceFactory(model_version=newer, hardware_profile=deployment.hardware_profile)
    deployment = services.deployment_update(
        actor=Actor.system(organization), deployment=deployment, version="0.2"
    )
    reconcile(deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == "updating"
    deployment = converge(deployment, cluster)
    assert (deployment.status, deployment.model_version) == ("ready", newer)
    pods = cluster.cluster.list_objects("pods")
    assert len(pods) == 1
    fetch = pods[0]["spec"]["initContainers"][0]["command"]
    assert fetch[fetch.index("--model") + 1].endswith("/0.2")


def test_delete_tears_down_waits_and_frees_the_name(organization, mixtral, kube, cluster):
    deployment = converge(deploy(organization), cluster)
    services.deployment_delete(actor=Actor.system(organization), deployment=deployment)
    deployment = converge(deployment, cluster)
    assert deployment.status == "deleted" and deployment.deleted_at
    for plural in ("deployments", "services", "networkpolicies", "poddisruptionbudgets"):
        assert cluster.cluster.list_objects(plural) == []
    assert cluster.cluster.list_objects("pods") == []
    assert cluster.cluster.list_objects("namespaces") == []
    usage = ReplicaUsage.objects.get(deployment=deployment)
    assert usage.ended_at is not None
    assert route_for(organization_id=organization.pk, model="chat") is None
    assert deploy(organization).pk != deployment.pk  # the name is free again


def test_steady_state_sweep_makes_no_writes_and_catches_drift(organization, mixtral, kube, cluster):
    deployment = converge(deploy(organization), cluster)
    k8s_writes = len(writes(cluster))
    with CaptureQueriesContext(connection) as queries:
        assert sweep() == ([], [])
    assert not [q for q in queries.captured_queries if not q["sql"].startswith("SELECT")]
    assert len(writes(cluster)) == k8s_writes

    # Someone deletes the Service; the sweep notices and the reconcile puts it back.
    namespace = f"sirocco-{organization.slug}"
    cluster.call(cluster.cluster._remove, Resource("", "v1", "services"), namespace, "chat")
    assert sweep() == ([], [str(deployment.pk)])
    assert reconcile(deployment.pk, force=True) is None
    assert cluster.cluster.get_object("services", namespace, "chat")
    assert sweep() == ([], [])


def test_orphans_in_the_cluster_are_found_and_removed(organization, mixtral, kube, cluster):
    deployment = converge(deploy(organization), cluster)
    assert find_orphans() == []
    # The deployment vanished from the database while its objects stayed (a restore, say).
    Deployment.objects.filter(pk=deployment.pk).update(status="deleted")
    orphans = find_orphans()
    namespace = f"sirocco-{organization.slug}"
    assert orphans == [namespace, f"{namespace}/{deployment.pk}"]
    for orphan in orphans:
        kube.remove_orphan(orphan)
    cluster.tick(3)
    assert cluster.cluster.list_objects("deployments") == []
    assert find_orphans() == []


def test_serverless_entries_follow_their_pool(organization):
    entry = ServerlessDeploymentFactory(organization=organization, status="pending")
    assert reconcile(entry.pk) is None
    entry.refresh_from_db()
    assert (entry.status, entry.progress_phase) == ("ready", "ready")
    Deployment.objects.filter(pk=entry.pool_id).update(status="failed")
    reconcile(entry.pk)
    entry.refresh_from_db()
    assert entry.status == "failed"
    assert "shared serverless pool" in entry.status_reason


def test_autoscaler_follows_in_flight_requests_and_scales_to_zero(
    organization, mixtral, kube, cluster
):
    deployment = converge(
        deploy(organization, min_replicas=0, max_replicas=3, scale_to_zero_after_seconds=300),
        cluster,
    )
    now = timezone.now()
    LoadReport.objects.create(
        deployment=deployment,
        source="gw-1",
        in_flight=20,
        in_flight_average=20,
        requests=100,
        last_request_at=now,
        reported_at=now,
    )
    [decision] = autoscale()
    assert decision.replicas == 3  # ceil(20 / 8), capped at max_replicas
    deployment = converge(deployment, cluster)
    assert (deployment.status, deployment.ready_replicas) == ("ready", 3)
    assert deployment.events.filter(reason="ScaledUp").exists()

    LoadReport.objects.update(
        in_flight=0, in_flight_average=0, last_request_at=now - timedelta(seconds=400)
    )
    long_ago = now - timedelta(seconds=600)
    Deployment.objects.filter(pk=deployment.pk).update(
        created_at=long_ago, last_scaled_at=long_ago, scale_up_requested_at=None
    )
    [decision] = autoscale()
    assert decision.replicas == 0
    deployment = converge(deployment, cluster)
    assert (deployment.status, deployment.desired_replicas) == ("ready", 0)
    assert cluster.cluster.list_objects("pods") == []
    assert not ReplicaUsage.objects.filter(deployment=deployment, ended_at=None).exists()
    assert route_for(organization_id=organization.pk, model="chat").can_scale_from_zero
    assert autoscale() == []  # asleep until a request comes

    services.deployment_request_scale_up(deployment_id=deployment.pk)
    deployment = converge(deployment, cluster)
    assert (deployment.status, deployment.ready_replicas) == ("ready", 1)
    assert autoscale() == []  # just woken: the idle clock starts again


def test_pools_scale_on_their_members_load(organization, mixtral, kube, cluster):
    pool = ServerlessPoolFactory(
        model_version=mixtral,
        hardware_profile__gpu_count=2,
        min_replicas=1,
        max_replicas=2,
        desired_replicas=1,
    )
    entry = ServerlessDeploymentFactory(organization=organization, pool=pool)
    services.load_report(
        deployment_id=entry.pk, source="gw", in_flight=12, requests=3, last_request_at=None
    )
    [decision] = autoscale()
    assert (decision.deployment_id, decision.replicas) == (str(pool.pk), 2)
    assert DeploymentEvent.objects.filter(deployment=pool, reason="ScaledUp").exists()
