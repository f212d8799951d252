"""The kubernetes provisioner against kmock's emulated API, the official client speaking HTTP."""

from dataclasses import replace

import pytest

from deployments.provisioners import PermanentError, TransientError
from deployments.provisioners.base import DeploymentSpec, ProfileSpec, RuntimeSpec
from deployments.provisioners.manifests import ANNOTATION_SPEC_HASH
from tests.deployments.kube import Fault, Resource

pytestmark = pytest.mark.nodb

MIXTRAL = DeploymentSpec(
    deployment_id="7d1c3a52-4f0e-4a8e-9a55-0c1d2e3f4a5b",
    name="mixtral",
    organization_slug="acme",
    organization_gpu_quota=10,
    replicas=2,
    model_slug="mixtral-8x7b-instruct",
    model_version="0.1",
    served_model_name="mixtral-8x7b-instruct",
    artifact_uri="s3://sirocco-models/mixtral-8x7b-instruct/0.1",
    weights_size_bytes=93_400_000_000,
    max_model_len=32768,
    runtime=RuntimeSpec(name="vllm", image="vllm/vllm-openai:v0.11.0", port=8000),
    profile=ProfileSpec(
        name="h100-80gb-x2",
        gpu_count=2,
        gpu_model="NVIDIA H100 80GB",
        gpu_memory_gb=80,
        cpu_request="16",
        memory_request="128Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    runtime_args={"max_model_len": 32768, "gpu_memory_utilization": 0.9},
)


def spec(**changes) -> DeploymentSpec:
    from dataclasses import replace

    return replace(MIXTRAL, **changes)


def writes(cluster) -> list:
    return [call for call in cluster.cluster.calls if call[0] in ("patch", "create", "delete")]


def test_apply_creates_every_object_and_pods_become_ready(kube, cluster):
    observation = kube.sync(MIXTRAL)
    assert not observation.rolled_out and observation.replicas == []
    kinds = {(plural, ns) for verb, _group, plural, ns in cluster.cluster.calls if verb == "patch"}
    assert kinds == {
        ("namespaces", None),
        ("rolebindings", "sirocco-acme"),
        ("resourcequotas", "sirocco-acme"),
        ("networkpolicies", "sirocco-acme"),
        ("services", "sirocco-acme"),
        ("poddisruptionbudgets", "sirocco-acme"),
        ("deployments", "sirocco-acme"),
    }
    namespace = cluster.cluster.get_object("namespaces", None, "sirocco-acme")
    assert namespace["metadata"]["labels"]["sirocco.dev/organization"] == "acme"
    quota = cluster.cluster.get_object("resourcequotas", "sirocco-acme", "gpu-quota")
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "10"}
    # The worker's rights in the namespace: the chart's tenant role, bound to its account here,
    # right after the namespace and before anything else it writes there.
    binding = cluster.cluster.get_object("rolebindings", "sirocco-acme", "sirocco-provisioner")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "sirocco-sirocco-provisioner-tenant",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sirocco-provisioner", "namespace": "sirocco"}
    ]
    order = [plural for verb, _group, plural, _ns in cluster.cluster.calls if verb == "patch"]
    assert order[:3] == ["namespaces", "rolebindings", "resourcequotas"]

    phases = []
    for _ in range(8):
        cluster.tick()
        observation = kube.observe(MIXTRAL)
        phases.append(sorted({r.phase for r in observation.replicas}))
        if observation.rolled_out:
            break
    assert observation.rolled_out, phases
    assert ["scheduling"] in phases or ["pulling_image"] in phases
    assert ["loading_weights"] in phases
    assert [r.ready for r in observation.replicas] == [True, True]
    assert all(r.endpoint.startswith("http://10.244.") for r in observation.replicas)
    assert all(r.running for r in observation.replicas)


def test_a_second_apply_of_the_same_spec_writes_nothing(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.tick(6)
    before = len(writes(cluster))
    kube.sync(MIXTRAL)
    kube.sync(MIXTRAL)
    assert len(writes(cluster)) == before
    deployment = cluster.cluster.get_object("deployments", "sirocco-acme", "mixtral")
    assert deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH]


def test_a_namespace_deleted_behind_our_back_is_put_back(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.call(cluster.cluster._remove, Resource("", "v1", "namespaces"), None, "sirocco-acme")
    other = spec(name="other", deployment_id="0e0e0e0e-0000-4000-8000-000000000001")
    kube.sync(other)  # the namespace and quota were applied by this process before
    assert cluster.cluster.get_object("namespaces", None, "sirocco-acme")
    assert cluster.cluster.get_object("resourcequotas", "sirocco-acme", "gpu-quota")
    assert cluster.cluster.get_object("deployments", "sirocco-acme", "other")


def test_scaling_changes_replicas_without_a_rolling_restart(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.tick(6)
    first = {r.name for r in kube.observe(MIXTRAL).replicas}
    kube.sync(spec(replicas=3))
    cluster.tick(6)
    observation = kube.observe(spec(replicas=3))
    assert observation.rolled_out
    assert first < {r.name for r in observation.replicas}  # the old pods kept running


def test_a_new_version_rolls_out_without_dropping_below_the_desired_count(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.tick(6)
    newer = spec(model_version="0.2", artifact_uri="s3://sirocco-models/mixtral/0.2")
    kube.sync(newer)
    running = set()
    for _ in range(30):
        cluster.tick()
        observation = kube.observe(newer)
        assert observation.ready_count >= 2, "maxUnavailable 0: never fewer ready than desired"
        running |= {(r.revision, r.model_slug, r.model_version) for r in observation.replicas}
        if observation.rolled_out:
            break
    assert observation.rolled_out
    assert {r.revision for r in observation.replicas} == {newer.revision()}
    # Each pod says the version it runs (GPU time is billed by it), old ones the old version.
    assert running == {
        (MIXTRAL.revision(), "mixtral-8x7b-instruct", "0.1"),
        (newer.revision(), "mixtral-8x7b-instruct", "0.2"),
    }


def test_unschedulable_replicas_say_no_node_has_the_gpus(kube, cluster):
    big = spec(
        replicas=3,
        profile=spec().profile.__class__(**{**spec().profile.__dict__, "gpu_count": 8}),
        organization_gpu_quota=100,
    )
    kube.sync(big)
    cluster.tick(3)
    observation = kube.observe(big)
    assert observation.waiting_reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in observation.waiting
    assert "8 × NVIDIA H100 80GB" in observation.waiting
    assert observation.failure is None  # still waiting: a node may free up
    cluster.cluster.past_deadline.add("mixtral")
    cluster.tick()
    observation = kube.observe(big)
    assert observation.failure_reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in observation.failure


@pytest.mark.parametrize(
    ("fault", "reason", "words"),
    [
        ("crash", "CrashLoopBackOff", "exit code 1): RuntimeError: CUDA error"),
        ("oom", "OOMKilled", "ran out of memory (OOMKilled; limit 128Gi)"),
    ],
)
def test_crashing_replicas_fail_with_a_clear_reason(kube, cluster, fault, reason, words):
    cluster.cluster.pod_faults["mixtral"] = fault
    kube.sync(MIXTRAL)
    observation = None
    for _ in range(12):
        cluster.tick()
        observation = kube.observe(MIXTRAL)
        if observation.failure:
            break
    assert observation.failure_reason == reason
    assert words in observation.failure


def test_image_pull_failures_wait_then_fail_at_the_progress_deadline(kube, cluster):
    cluster.cluster.pod_faults["mixtral"] = "image_pull"
    kube.sync(MIXTRAL)
    cluster.tick(5)
    observation = kube.observe(MIXTRAL)
    assert observation.waiting_reason == "ImagePullBackOff"
    assert "Cannot pull the image vllm/vllm-openai:v0.11.0" in observation.waiting
    cluster.cluster.past_deadline.add("mixtral")
    cluster.tick()
    assert kube.observe(MIXTRAL).failure_reason == "ImagePullBackOff"


def test_the_namespace_gpu_quota_blocks_extra_replicas(kube, cluster):
    tight = spec(replicas=3, organization_gpu_quota=4)
    kube.sync(tight)
    cluster.tick(2)
    observation = kube.observe(tight)
    assert observation.waiting_reason == "FailedCreate"
    assert "exceeded quota: gpu-quota" in observation.waiting


@pytest.mark.parametrize("status", [500, 503, 409, 429])
def test_api_errors_are_transient(kube, cluster, status):
    cluster.cluster.faults.append(Fault("patch", "deployments", status=status))
    with pytest.raises(TransientError, match=f"answered {status}"):
        kube.sync(MIXTRAL)
    kube.sync(MIXTRAL)  # the next attempt goes through
    assert cluster.cluster.get_object("deployments", "sirocco-acme", "mixtral")


def test_a_timeout_is_transient(kube, cluster):
    kube.client.timeout = 0.3
    cluster.cluster.faults.append(Fault("get", "deployments", delay=1.0, times=2))
    with pytest.raises(TransientError, match="did not answer"):
        kube.sync(MIXTRAL)


def test_forbidden_is_permanent_and_says_who_must_act(kube, cluster):
    cluster.cluster.faults.append(
        Fault("patch", "namespaces", status=403, message="namespaces is forbidden")
    )
    with pytest.raises(PermanentError, match="platform team must fix"):
        kube.sync(MIXTRAL)


def test_the_api_server_rejects_an_invalid_manifest_and_it_is_permanent(kube, cluster):
    # A toleration with a misspelt field, as an operator might type it into a profile.
    bad_profile = replace(MIXTRAL.profile, tolerations=({"key": "gpu", "operatr": "Exists"},))
    with pytest.raises(
        PermanentError, match="The cluster rejected apply Deployment mixtral"
    ) as error:
        kube.sync(spec(profile=bad_profile))
    assert "operatr" in error.value.message
    [request] = [r for r in cluster.cluster if "deployments/mixtral" in str(r.url)][-1:]
    assert request.params == {
        "fieldManager": "sirocco",
        "force": "true",
        "fieldValidation": "Strict",
    }


def test_weights_outside_s3_cannot_run_in_a_cluster(kube, cluster):
    with pytest.raises(PermanentError, match="cannot read"):
        kube.sync(spec(artifact_uri="file:///var/artifacts/mixtral"))


def test_delete_removes_everything_and_waits_until_gone(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.tick(6)
    assert kube.delete(MIXTRAL) is False  # pods still terminate, then the namespace
    passes = 0
    while not kube.delete(MIXTRAL) and passes < 5:
        cluster.tick()
        passes += 1
    assert passes == 3
    for plural in ("deployments", "services", "networkpolicies", "poddisruptionbudgets", "pods"):
        assert cluster.cluster.list_objects(plural) == [], plural
    assert cluster.cluster.list_objects("namespaces") == []


def test_delete_keeps_the_namespace_while_the_organization_has_other_deployments(kube, cluster):
    other = spec(name="other", deployment_id="0e0e0e0e-0000-4000-8000-000000000000")
    kube.sync(MIXTRAL)
    kube.sync(other)
    cluster.tick(6)
    while not kube.delete(MIXTRAL):
        cluster.tick()
    assert cluster.cluster.get_object("namespaces", None, "sirocco-acme")
    assert cluster.cluster.get_object("deployments", "sirocco-acme", "other")


def test_drift_is_found_with_a_few_reads(kube, cluster):
    kube.sync(MIXTRAL)
    cluster.tick(6)
    names = {r.name for r in kube.observe(MIXTRAL).replicas}
    known = {MIXTRAL.deployment_id: {"ready": 2, "replicas": names}}
    before = len(cluster.cluster.calls)
    assert kube.drifted({MIXTRAL.deployment_id: MIXTRAL}, known) == set()
    calls = cluster.cluster.calls[before:]
    assert {verb for verb, *_ in calls} == {"list"} and len(calls) == 5
    # Someone deletes the Service behind our back.
    cluster.call(cluster.cluster._remove, Resource("", "v1", "services"), "sirocco-acme", "mixtral")
    assert kube.drifted({MIXTRAL.deployment_id: MIXTRAL}, known) == {MIXTRAL.deployment_id}
