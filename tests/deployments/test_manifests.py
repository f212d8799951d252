"""Rendered manifests: what a GPU operator would write, valid against Kubernetes 1.31 in strict
mode, and `render_manifests` prints them without a database or a cluster."""

import json
from io import StringIO

import kubernetes_validate
import pytest
import yaml
from django.core.management import CommandError, call_command

from catalog import seeds
from catalog.fit import fit
from catalog.models import HardwareProfile, Model, ModelVersion, ServingRuntime
from deployments.provisioners import PermanentError
from deployments.provisioners.base import RuntimeSpec
from deployments.provisioners.manifests import ClusterOptions, render_all, render_args
from tests.deployments.test_kubernetes_provisioner import MIXTRAL, spec

pytestmark = pytest.mark.nodb  # and no `db` fixture: any database access fails the test


def render(**options) -> list[dict]:
    out = StringIO()
    defaults = {
        "org": "acme",
        "model": "mixtral-8x7b-instruct-v0.1",
        "profile": "h100-80gb-x2",
        "name": "mixtral",
    }
    call_command("render_manifests", stdout=out, **{**defaults, **options})
    return list(yaml.safe_load_all(out.getvalue()))


def test_render_manifests_prints_every_object_without_a_database():
    objects = render()
    assert [o["kind"] for o in objects] == [
        "Namespace",
        "ResourceQuota",
        "NetworkPolicy",
        "Service",
        "PodDisruptionBudget",
        "Deployment",
    ]
    assert render() == objects  # deterministic


def test_the_mixtral_pod_is_what_a_gpu_operator_would_write():
    deployment = render()[-1]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert deployment["spec"]["progressDeadlineSeconds"] >= 1800
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == seeds.VLLM_IMAGE and ":latest" not in server["image"]
    args = server["args"]

    def flag(name):
        return args[args.index(name) + 1]

    assert flag("--model") == "/models/mixtral-8x7b-instruct-v0.1"
    assert flag("--served-model-name") == "mixtral-8x7b-instruct-v0.1"
    assert flag("--tensor-parallel-size") == "2"
    assert flag("--max-model-len") == "32768"
    assert flag("--gpu-memory-utilization") == "0.9"
    assert "--enable-prefix-caching" in args
    resources = server["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    # Weights: an init container copies them from S3 into a volume the server reads.
    # The runtime image's fetcher, which verifies every file against the version's manifest.
    fetcher = pod["initContainers"][0]
    command = fetcher["command"]
    assert command[:4] == ["python", "-m", "runtime", "download"]
    assert command[command.index("--model") + 1].startswith("s3://")
    weights_mount = next(m["mountPath"] for m in fetcher["volumeMounts"] if m["name"] == "weights")
    assert command[command.index("--out") + 1].startswith(weights_mount)
    assert int(volumes["weights"]["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= 94
    # Probes: a startup budget for ~93 GB of weights, readiness on /v1/models, liveness /health.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert server["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert server["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_namespace_quota_and_network_policy():
    namespace, quota, policy, service, budget, _ = render(max_gpus=16)
    assert namespace["metadata"]["labels"]["sirocco.dev/organization"] == "acme"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The quota leaves room for the one surge replica of a rolling update.
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "18"}
    source = policy["spec"]["ingress"][0]["from"][0]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "sirocco"}
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert service["spec"]["selector"] == budget["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == 1


def _fitting_combinations():
    runtime = ServingRuntime(**next(r for r in seeds.RUNTIMES if r["name"] == "vllm"))
    for model_seed in seeds.MODELS:
        fields = {k: v for k, v in model_seed.items() if k not in ("version", "token_price")}
        version = ModelVersion(
            model=Model(**fields), serving_runtime=runtime, **model_seed["version"]
        )
        for profile in seeds.HARDWARE_PROFILES:
            if fit(version=version, profile=HardwareProfile(**profile)).fits:
                yield model_seed["slug"], profile["name"]


@pytest.mark.parametrize(("model", "profile"), list(_fitting_combinations()))
def test_every_rendered_manifest_validates_against_kubernetes_1_31_strict(model, profile):
    for obj in render(model=model, profile=profile, replicas=2):
        assert kubernetes_validate.validate(obj, "1.31", strict=True) == "1.31"


def test_the_builtin_runtime_on_cpu_validates_too():
    from deployments.provisioners.base import ProfileSpec, RuntimeSpec

    builtin = next(r for r in seeds.RUNTIMES if r["name"] == "builtin")
    cpu = spec(
        runtime=RuntimeSpec(
            name="builtin",
            image=builtin["image"],
            port=builtin["port"],
            args_template=tuple(builtin["args_template"]),
            device="cpu",
        ),
        profile=ProfileSpec(name="cpu-small", cpu_request="2", memory_request="4Gi"),
        weights_size_bytes=8_000_000,
    )
    objects = render_all(cpu, ClusterOptions())
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    server = objects[-1]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in server["resources"]["requests"]
    assert server["args"][:3] == ["serve", "--model", "/models/mixtral-8x7b-instruct"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"model": "gpt-9"}, "Unknown model 'gpt-9'. Seeded models:"),
        ({"profile": "tpu"}, "Unknown hardware profile 'tpu'"),
        ({"profile": "cpu-small"}, "does not fit cpu-small"),
        ({"name": "Not_DNS"}, "Invalid deployment"),
        ({"weights_uri": "file:///srv/mixtral"}, "cannot read"),
    ],
)
def test_render_manifests_says_what_is_wrong(options, words):
    with pytest.raises(CommandError, match=words):
        render(**options)


def test_an_unknown_placeholder_in_a_runtime_template_is_a_clear_error():
    from dataclasses import replace

    broken = replace(MIXTRAL, runtime=replace(MIXTRAL.runtime, args_template=("{flux}",)))
    with pytest.raises(PermanentError, match="uses 'flux'"):
        render_args(broken)


def test_model_pods_may_reach_dns_and_the_artifact_store_only():
    policy = render()[2]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns, store = policy["spec"]["egress"]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in dns["ports"]} == {53}
    # HTTPS to the internet (S3), never private ranges or the metadata service.
    [block] = store["to"]
    assert block["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert "169.254.0.0/16" in block["ipBlock"]["except"]
    assert "10.0.0.0/8" in block["ipBlock"]["except"]
    assert store["ports"] == [{"protocol": "TCP", "port": 443}]
    assert kubernetes_validate.validate(policy, "1.31", strict=True) == "1.31"


def test_an_in_cluster_artifact_store_is_configured_by_cidr_and_port():
    from deployments.provisioners.manifests import render_egress_rules

    options = ClusterOptions(
        artifact_egress_cidrs=("10.96.0.0/12", "0.0.0.0/0"),
        artifact_egress_except=("169.254.0.0/16", "10.0.0.0/8"),
        artifact_egress_ports=(9000,),
    )
    _dns, store = render_egress_rules(options)
    # An exception outside a block (or as wide as it) is left out: the API would reject it.
    assert store["to"] == [
        {"ipBlock": {"cidr": "10.96.0.0/12"}},
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16", "10.0.0.0/8"]}},
    ]
    assert store["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert len(render_egress_rules(ClusterOptions(artifact_egress_cidrs=()))) == 1


def test_the_worker_binds_its_tenant_role_in_the_namespace_right_after_making_it():
    from deployments.provisioners.manifests import render_organization_objects

    options = ClusterOptions(
        tenant_role="sirocco-sirocco-provisioner-tenant",
        tenant_role_subject="system:serviceaccount:sirocco:sirocco-provisioner",
    )
    namespace, binding, quota = render_organization_objects(spec(), options)
    assert (namespace["kind"], binding["kind"], quota["kind"]) == (
        "Namespace",
        "RoleBinding",
        "ResourceQuota",
    )
    assert binding["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert binding["roleRef"]["name"] == "sirocco-sirocco-provisioner-tenant"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sirocco-provisioner", "namespace": "sirocco"}
    ]
    assert kubernetes_validate.validate(binding, "1.31", strict=True) == "1.31"
    # Without the settings (RBAC granted out of band) there is no binding to apply.
    assert [o["kind"] for o in render_organization_objects(spec(), ClusterOptions())] == [
        "Namespace",
        "ResourceQuota",
    ]
    with pytest.raises(PermanentError, match="system:serviceaccount"):
        render_organization_objects(
            spec(), ClusterOptions(tenant_role="r", tenant_role_subject="x")
        )


class _AuthorizerCatchingUp:
    """What an API server answers while its authorizer has not seen a new RoleBinding yet."""

    def __init__(self):
        self.applied = []

    def apply(self, obj):
        if obj["kind"] == "ResourceQuota":
            raise PermanentError("The platform is not allowed to apply ResourceQuota (forbidden)")
        self.applied.append(obj["kind"])


def test_a_403_just_after_the_binding_is_retried_not_a_failure():
    from deployments.provisioners import TransientError
    from deployments.provisioners.kubernetes import _apply_organization_objects
    from deployments.provisioners.manifests import render_organization_objects

    options = ClusterOptions(
        tenant_role="tenant", tenant_role_subject="system:serviceaccount:sirocco:worker"
    )
    client = _AuthorizerCatchingUp()
    with pytest.raises(TransientError, match="not in effect yet"):
        _apply_organization_objects(client, render_organization_objects(spec(), options))
    assert client.applied == ["Namespace", "RoleBinding"]
    # With no binding of ours, a 403 is what it says: the platform's permissions are wrong.
    with pytest.raises(PermanentError):
        _apply_organization_objects(
            _AuthorizerCatchingUp(), render_organization_objects(spec(), ClusterOptions())
        )


def test_the_embedding_model_runs_on_vllms_pooling_runner():
    """The version's own flags (runtime_args keys starting with "--") follow the template;
    `--runner pooling` is vLLM's documented way to serve an embedding model
    (https://docs.vllm.ai/en/latest/models/pooling_models/)."""
    args = render(model="bge-m3", profile="h100-80gb-x1", name="vectors")[-1]["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    assert args[args.index("--runner") + 1] == "pooling"
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--served-model-name") + 1] == "bge-m3"
    assert args.count("--runner") == 1
    # vLLM's boolean flags take the last occurrence: the template's --enable-prefix-caching
    # comes first, the version's --no-enable-prefix-caching after it.
    assert args.index("--no-enable-prefix-caching") > args.index("--enable-prefix-caching")
    chat = render()[-1]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--runner" not in chat


def test_version_flags_render_after_the_template_in_name_order():
    from deployments.provisioners.base import ProfileSpec, RuntimeSpec

    flagged = spec(
        runtime=RuntimeSpec(
            name="vllm", image="vllm", port=8000, args_template=("--model", "{model}")
        ),
        profile=ProfileSpec(name="h100", cpu_request="2", memory_request="4Gi", gpu_count=1),
        runtime_args={"--runner": "pooling", "--enforce-eager": True, "--trust-remote-code": False},
    )
    assert render_args(flagged)[2:] == ["--enforce-eager", "--runner", "pooling"]


# The flags of `vllm serve` these pods use, with their accepted values, as the pinned image's
# vLLM (catalog/seeds.py: VLLM_IMAGE) defines them: EngineArgs/ModelConfig (`--tokenizer-mode`
# auto|hf|slow|mistral|deepseek_v32, `--config-format` auto|hf|mistral, `--load-format` with
# mistral), FrontendArgs (`--enable-auto-tool-choice`, `--tool-call-parser`, whose built-in
# parsers include mistral), StructuredOutputsConfig (`--structured-outputs-config` JSON, backend
# auto|xgrammar|guidance|outlines|lm-format-enforcer). None: a flag without a value.
VLLM_FLAGS = {
    "--model": str,
    "--served-model-name": str,
    "--tensor-parallel-size": int,
    "--max-model-len": int,
    "--gpu-memory-utilization": float,
    "--enable-prefix-caching": None,
    "--host": str,
    "--port": int,
    "--tokenizer-mode": {"auto", "hf", "slow", "mistral", "deepseek_v32"},
    "--config-format": {"auto", "hf", "mistral"},
    "--load-format": {"auto", "pt", "safetensors", "npcache", "dummy", "mistral"},
    "--enable-auto-tool-choice": None,
    "--tool-call-parser": {"mistral", "hermes", "llama3_json", "pythonic"},
    "--structured-outputs-config": "json",
}
STRUCTURED_OUTPUT_BACKENDS = {"auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"}


def _vllm_flags(args: list[str]) -> dict[str, str | None]:
    """The args as {flag: value}, each checked against VLLM_FLAGS."""
    parsed, index = {}, 0
    while index < len(args):
        flag = args[index]
        assert flag in VLLM_FLAGS, f"{flag} is not a vLLM flag this chart knows"
        kind = VLLM_FLAGS[flag]
        if kind is None:
            parsed[flag], index = None, index + 1
            continue
        value = args[index + 1]
        if isinstance(kind, set):
            assert value in kind, f"{flag} {value}"
        elif kind == "json":
            config = json.loads(value)
            assert config["backend"] in STRUCTURED_OUTPUT_BACKENDS
        else:
            kind(value)
        parsed[flag], index = value, index + 2
    return parsed


@pytest.mark.parametrize(
    ("model", "tools"),
    [
        ("mistral-7b-instruct-v0.3", True),
        ("mixtral-8x22b-instruct-v0.1", True),
        ("mixtral-8x7b-instruct-v0.1", False),
    ],
)
def test_each_seeded_mistral_pod_has_its_tool_and_structured_output_flags(model, tools):
    seed = next(m for m in seeds.MODELS if m["slug"] == model)
    vllm = next(r for r in seeds.RUNTIMES if r["name"] == "vllm")
    runtime = RuntimeSpec(
        name="vllm", image=vllm["image"], port=8000, args_template=tuple(vllm["args_template"])
    )
    args = render_args(
        spec(model_slug=model, runtime=runtime, runtime_args=seed["version"]["runtime_args"])
    )
    flags = _vllm_flags(args)
    assert json.loads(flags["--structured-outputs-config"]) == {"backend": "guidance"}
    if tools:
        assert "--enable-auto-tool-choice" in flags
        assert flags["--tool-call-parser"] == "mistral"
        assert flags["--tokenizer-mode"] == "mistral"
        assert flags["--config-format"] == flags["--load-format"] == "mistral"
    else:  # a v1 tokenizer has no [TOOL_CALLS]: vLLM's mistral parser would refuse to start
        assert "--tool-call-parser" not in flags and "--enable-auto-tool-choice" not in flags


def test_the_rendered_mistral_pod_passes_the_flags():
    server = render(model="mistral-7b-instruct-v0.3", profile="h100-80gb-x1")[-1]["spec"][
        "template"
    ]["spec"]["containers"][0]
    flags = _vllm_flags(server["args"])
    assert flags["--tool-call-parser"] == "mistral" and "--enable-auto-tool-choice" in flags
