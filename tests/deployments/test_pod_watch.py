"""The kubernetes provisioner's pod watch against the emulated API (which streams WATCH as an
API server does): a deleted pod or a crash loop is noticed within 2 s, the reconcile pass it
asks for shows it in status and events, and an expired resourceVersion (410 Gone) means a new
LIST, not a lost change."""

import queue
import threading
import time

import pytest

from accounts.actors import Actor
from deployments import services
from deployments.models import Deployment, DeploymentEvent
from deployments.provisioners.kubernetes import PodWatch
from deployments.reconciler import reconcile
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.kube import PODS

NOTICED_WITHIN_SECONDS = 2.0


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


class Watching:
    """A PodWatch on a thread; what it reports lands in `changes`."""

    def __init__(self, kube, *, timeout_seconds: int = 30):
        self.changes: queue.Queue = queue.Queue()
        self.watch = PodWatch(
            kube.client,
            lambda deployment_id, why: self.changes.put((time.monotonic(), deployment_id, why)),
            timeout_seconds=timeout_seconds,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.watch.lists and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the WATCH request is open
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=self.watch.timeout_seconds + 5)

    def drain(self) -> None:
        while not self.changes.empty():
            self.changes.get_nowait()

    def next_about(self, deployment_id: str, *, containing: str = "", timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                at, seen_id, why = self.changes.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if seen_id == deployment_id and containing in why:
                return at, why
        pytest.fail(f"no change about {deployment_id} ({containing!r}) in {timeout} s")


def converged(deployment_id, cluster) -> Deployment:
    for _ in range(30):
        if reconcile(deployment_id) is None:
            return Deployment.objects.get(pk=deployment_id)
        cluster.tick()
    pytest.fail("did not converge")


def delete_pod(cluster, pod: dict) -> None:
    """As `kubectl delete pod` would (not through the provisioner's client: the verbs it uses
    are the RBAC the chart grants, and it never deletes a pod)."""
    metadata = pod["metadata"]
    cluster.call(cluster.cluster._delete, PODS, metadata["namespace"], metadata["name"])


def pods_of(cluster, deployment) -> list[dict]:
    return [
        pod
        for pod in cluster.cluster.list_objects("pods")
        if pod["metadata"]["labels"].get("sirocco.dev/deployment-id") == str(deployment.pk)
    ]


@pytest.mark.django_db
def test_a_deleted_pod_is_noticed_through_the_watch_and_shows_in_status_and_events(
    organization, mixtral, kube, cluster
):
    deployment = services.deployment_create(
        actor=Actor.system(organization),
        name="chat",
        model="mixtral-8x7b-instruct",
        hardware_profile="h100-80gb-x2",
    )
    deployment = converged(deployment.pk, cluster)
    assert (deployment.status, deployment.ready_replicas) == ("ready", 1)
    with Watching(kube) as watching:
        watching.drain()
        [pod] = pods_of(cluster, deployment)
        deleted_at = time.monotonic()
        delete_pod(cluster, pod)
        at, why = watching.next_about(str(deployment.pk), containing="pod")
        assert at - deleted_at <= NOTICED_WITHIN_SECONDS, why
        assert pod["metadata"]["name"] in why
        reconcile(deployment.pk)  # the pass the watch asked for
    deployment.refresh_from_db()
    assert deployment.ready_replicas == 0
    assert deployment.status == "provisioning"  # never "ready" with no replica ready
    reasons = list(DeploymentEvent.objects.filter(deployment=deployment).values_list("reason"))
    assert ("ReplicasUnavailable",) in reasons
    assert converged(deployment.pk, cluster).status == "ready"  # a new pod took its place


@pytest.mark.django_db
def test_a_crash_loop_is_noticed_through_the_watch_and_shows_in_status_and_events(
    organization, mixtral, kube, cluster
):
    deployment = services.deployment_create(
        actor=Actor.system(organization),
        name="chat",
        model="mixtral-8x7b-instruct",
        hardware_profile="h100-80gb-x2",
    )
    deployment = converged(deployment.pk, cluster)
    with Watching(kube) as watching:
        watching.drain()
        crashed_at = time.monotonic()
        cluster.call(cluster.cluster.crash_loop, "chat")
        cluster.tick()
        at, why = watching.next_about(str(deployment.pk), containing="crash-looping")
        assert at - crashed_at <= NOTICED_WITHIN_SECONDS, why
        assert "exit code 1 (Error)" in why
        reconcile(deployment.pk)
    deployment.refresh_from_db()
    assert (deployment.status, deployment.ready_replicas) == ("provisioning", 0)
    event = DeploymentEvent.objects.filter(deployment=deployment, reason="CrashLoopBackOff").first()
    assert event is not None and "exited with exit code 1 (Error)" in event.message


@pytest.mark.nodb
def test_an_expired_resource_version_means_a_new_list_and_no_lost_change(kube, cluster):
    from tests.deployments.test_kubernetes_provisioner import MIXTRAL

    kube.sync(MIXTRAL)
    cluster.tick(6)
    # The server ends each watch after a second; the history is compacted meanwhile.
    with Watching(kube, timeout_seconds=1) as watching:
        cluster.call(cluster.cluster.compact)
        time.sleep(1.5)  # the watch resumed from a compacted version: 410, LIST again
        assert watching.watch.lists >= 2
        watching.drain()
        [pod, *_] = cluster.cluster.list_objects("pods")
        delete_pod(cluster, pod)
        watching.next_about(MIXTRAL.deployment_id, containing=pod["metadata"]["name"])
    assert ("watch", "", "pods", None) in cluster.cluster.calls


@pytest.mark.nodb
def test_the_watcher_command_is_for_the_kubernetes_provisioner(settings, tmp_path):
    from django.core.management import CommandError, call_command

    settings.SIROCCO_PROVISIONER = "local"
    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match="needs no watcher"):
        call_command("watch_replicas")
