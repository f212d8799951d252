"""Kubernetes manifests for one deployment, rendered from plain inputs (no database, no cluster).

Per organization: a Namespace (labelled, Pod Security "restricted") and a ResourceQuota on
`requests.nvidia.com/gpu`. Per deployment: a Deployment (the model server pods), a Service, a
NetworkPolicy that admits only the gateway, and a PodDisruptionBudget.

The pod is what a GPU operator would write for vLLM: a pinned image; tensor parallelism = the
GPU count; `nvidia.com/gpu` requests = limits; the profile's node selector and tolerations;
`/dev/shm` in memory for NCCL; the weights fetched from S3 by an init container into a volume;
a startup probe with a budget sized to the weights, readiness on `/v1/models`, liveness on
`/health`; a grace period and preStop pause so in-flight requests finish; non-root; rollouts
that never drop below the desired count (maxUnavailable 0).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
from dataclasses import dataclass, field

from deployments.provisioners.base import DeploymentSpec, PermanentError

MANAGED_BY = "sirocco"
FIELD_MANAGER = "sirocco"
LABEL_DEPLOYMENT_ID = "sirocco.dev/deployment-id"
LABEL_ORGANIZATION = "sirocco.dev/organization"
LABEL_REVISION = "sirocco.dev/revision"
ANNOTATION_SPEC_HASH = "sirocco.dev/spec-hash"
# "model-slug:version" on the Deployment and its pod template, so every pod says which model
# version it runs (GPU time is billed per version; during a rolling update two versions run).
ANNOTATION_MODEL = "sirocco.dev/model"
CONTAINER_NAME = "server"
FETCH_CONTAINER_NAME = "fetch-weights"
WEIGHTS_MOUNT = "/models"
GIB = 1024**3

# Long enough for a ~10 GB image pull plus ~90 GB of weights; Kubernetes marks the rollout
# failed (ProgressDeadlineExceeded) after it, and so do we.
PROGRESS_DEADLINE_SECONDS = 3600
# In-flight generations can take a minute; the gateway stops routing during the preStop pause.
TERMINATION_GRACE_SECONDS = 120
PRE_STOP_SLEEP_SECONDS = 15

DEFAULT_ARGS = {
    "vllm": (
        "--model",
        "{model_path}",
        "--served-model-name",
        "{served_model_name}",
        "--host",
        "0.0.0.0",  # noqa: S104 - in a pod, the API listens on the pod's address
        "--port",
        "{port}",
        "--tensor-parallel-size",
        "{tensor_parallel_size}",
        "--max-model-len",
        "{max_model_len}",
        "--gpu-memory-utilization",
        "{gpu_memory_utilization}",
        "--enable-prefix-caching",
    ),
    "builtin": (
        "serve",
        "--model",
        "{model_path}",
        "--served-model-name",
        "{served_model_name}",
        "--host",
        "0.0.0.0",  # noqa: S104 - in a pod, the API listens on the pod's address
        "--port",
        "{port}",
        "--max-model-len",
        "{max_model_len}",
    ),
}


# Private, shared and link-local ranges (169.254.169.254 is the cloud's metadata service).
PRIVATE_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
)


@dataclass(frozen=True)
class ClusterOptions:
    """How this installation's cluster is laid out (from settings; see README)."""

    namespace_prefix: str = "sirocco-"
    gateway_namespace: str = "sirocco"
    gateway_pod_labels: dict = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "sirocco",
            "app.kubernetes.io/component": "gateway",
        }
    )
    fetcher_image: str = "sirocco/runtime:0.1.0"
    # The name of a Secret with AWS_* credentials for the weights bucket (not a secret itself).
    artifact_secret: str = "sirocco-artifact-store"  # noqa: S105
    aws_endpoint_url: str = ""
    # Where model pods may connect besides DNS: the artifact store their init container copies
    # weights from. The default is HTTPS to the internet (S3), never to private ranges or the
    # cloud's metadata service; an in-cluster store (MinIO…) needs its CIDR and port here.
    artifact_egress_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    artifact_egress_except: tuple[str, ...] = PRIVATE_RANGES
    artifact_egress_ports: tuple[int, ...] = (443,)
    # The ClusterRole (the chart's) that grants the worker what it does inside an organization's
    # namespace, bound there by a RoleBinding the worker applies with the namespace, and the
    # worker's ServiceAccount as "system:serviceaccount:<namespace>:<name>". Empty: no binding
    # (the operator grants those rights another way).
    tenant_role: str = ""
    tenant_role_subject: str = ""

    @classmethod
    def from_settings(cls) -> ClusterOptions:
        from django.conf import settings

        return cls(
            namespace_prefix=settings.SIROCCO_K8S_NAMESPACE_PREFIX,
            gateway_namespace=settings.SIROCCO_K8S_GATEWAY_NAMESPACE,
            gateway_pod_labels=dict(settings.SIROCCO_K8S_GATEWAY_POD_LABELS),
            fetcher_image=settings.SIROCCO_K8S_FETCHER_IMAGE,
            artifact_secret=settings.SIROCCO_K8S_ARTIFACT_SECRET,
            aws_endpoint_url=settings.SIROCCO_K8S_AWS_ENDPOINT_URL,
            artifact_egress_cidrs=tuple(settings.SIROCCO_K8S_ARTIFACT_EGRESS_CIDRS),
            artifact_egress_except=tuple(settings.SIROCCO_K8S_ARTIFACT_EGRESS_EXCEPT),
            artifact_egress_ports=tuple(settings.SIROCCO_K8S_ARTIFACT_EGRESS_PORTS),
            tenant_role=settings.SIROCCO_K8S_TENANT_ROLE,
            tenant_role_subject=settings.SIROCCO_K8S_TENANT_ROLE_SUBJECT,
        )

    def namespace(self, organization_slug: str) -> str:
        return f"{self.namespace_prefix}{organization_slug}"


def common_labels(spec: DeploymentSpec) -> dict:
    return {
        "app.kubernetes.io/name": "sirocco-model-server",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_ORGANIZATION: spec.organization_slug,
        LABEL_DEPLOYMENT_ID: spec.deployment_id,
    }


def model_annotation(spec: DeploymentSpec) -> str:
    return f"{spec.model_slug}:{spec.model_version}"


def selector_labels(spec: DeploymentSpec) -> dict:
    return {LABEL_DEPLOYMENT_ID: spec.deployment_id}


def weights_gib(spec: DeploymentSpec) -> int:
    return max(1, math.ceil(spec.weights_size_bytes / GIB))


def startup_budget_seconds(spec: DeploymentSpec) -> int:
    """How long the server may take to load its weights (already on local disk) into memory,
    compile and warm up: 10 minutes plus 6 s per GiB (Mixtral 8x7B, ~87 GiB: ~19 minutes)."""
    return 600 + 6 * weights_gib(spec)


def model_path(spec: DeploymentSpec) -> str:
    return f"{WEIGHTS_MOUNT}/{spec.model_slug}"


def render_args(spec: DeploymentSpec) -> list[str]:
    """The server's arguments: the runtime's template with this deployment's values, then the
    version's own flags (runtime_args keys that start with "--", in name order: `true` alone,
    `false` left out, any other value after its flag), such as vLLM's `--runner pooling` for
    an embedding model."""
    runtime_args = dict(spec.runtime_args)
    flags = {key: value for key, value in runtime_args.items() if key.startswith("--")}
    values = {
        **{
            key: value
            for key, value in runtime_args.items()
            if value is not None and key not in flags
        },
        "model": model_path(spec),
        "model_path": model_path(spec),
        "served_model_name": spec.served_model_name,
        "port": spec.runtime.port,
        "host": "0.0.0.0",  # noqa: S104 - the pod's port is the API
        "tensor_parallel_size": max(1, spec.profile.gpu_count),
        "gpu_count": spec.profile.gpu_count,
        "max_model_len": spec.max_model_len or runtime_args.get("max_model_len") or 4096,
        "gpu_memory_utilization": runtime_args.get("gpu_memory_utilization", 0.9),
        "device": "cuda" if spec.profile.gpu_count else "cpu",
    }
    template = spec.runtime.args_template or DEFAULT_ARGS.get(spec.runtime.name, ())
    args = []
    for item in template:
        try:
            args.append(str(item).format_map(values))
        except KeyError as missing:
            raise PermanentError(
                f"The {spec.runtime.name} runtime's argument template uses {missing} which has "
                "no value for this model version; the platform team must fix the catalog."
            ) from None
    for flag, value in sorted(flags.items()):
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def _container_env(spec: DeploymentSpec) -> list[dict]:
    # The images run as an arbitrary non-root user: point every cache at a writable volume.
    return [
        {"name": "HOME", "value": "/cache"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]


def _restricted_security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def weights_uri(spec: DeploymentSpec) -> str:
    uri = spec.artifact_uri
    if not uri:
        raise PermanentError(
            f"The weights of {spec.model_slug} {spec.model_version} are not imported yet, so no "
            "server can load them. The platform team must import them first."
        )
    if not uri.startswith("s3://"):
        raise PermanentError(
            f"The weights of {spec.model_slug} {spec.model_version} are in {uri}, which the "
            "cluster cannot read: the platform must store artifacts in S3 (ARTIFACT_STORE_URL) "
            "for the kubernetes provisioner."
        )
    return uri


def render_deployment(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    namespace = options.namespace(spec.organization_slug)
    gpus = spec.profile.gpu_count
    port = spec.runtime.port
    resources: dict = {
        "requests": {"cpu": spec.profile.cpu_request, "memory": spec.profile.memory_request},
        # No CPU limit: throttling a tokenizer thread stalls the GPUs. Memory is a hard limit.
        "limits": {"memory": spec.profile.memory_request},
    }
    if gpus:
        # Extended resources cannot be overcommitted: requests must equal limits.
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    budget = startup_budget_seconds(spec)
    probe_period = 10
    server = {
        "name": CONTAINER_NAME,
        "image": spec.runtime.image,
        "imagePullPolicy": "IfNotPresent",
        "args": render_args(spec),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": _container_env(spec),
        "resources": resources,
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a volume, not a temp file
            {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
            {"name": "cache", "mountPath": "/cache"},
        ],
        "startupProbe": {
            "httpGet": {"path": spec.runtime.health_path, "port": "http"},
            "periodSeconds": probe_period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(budget / probe_period),
        },
        "readinessProbe": {
            "httpGet": {"path": spec.runtime.readiness_path, "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": spec.runtime.health_path, "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "failureThreshold": 6,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}},
        "securityContext": _restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    fetch_env = []
    if options.aws_endpoint_url:
        fetch_env.append({"name": "AWS_ENDPOINT_URL", "value": options.aws_endpoint_url})
    fetcher = {
        "name": FETCH_CONTAINER_NAME,
        "image": options.fetcher_image,
        "imagePullPolicy": "IfNotPresent",
        # The runtime image's own fetcher: copies the folder from S3 (boto3 reads
        # AWS_ENDPOINT_URL and the credentials from the environment), keeps files already there
        # with the right size (a restarted pod resumes), and verifies every file against the
        # version's manifest.json before the server may start.
        "command": [
            "python",
            "-m",
            "runtime",
            "download",
            "--model",
            weights_uri(spec),
            "--out",
            model_path(spec),
        ],
        "env": fetch_env,
        "envFrom": [{"secretRef": {"name": options.artifact_secret, "optional": True}}],
        "resources": {
            "requests": {"cpu": "2", "memory": "2Gi"},
            "limits": {"memory": "4Gi"},
        },
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_MOUNT}],
        "securityContext": {**_restricted_security_context(), "readOnlyRootFilesystem": True},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    template_labels = {**common_labels(spec), LABEL_REVISION: spec.revision()}
    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [fetcher],
        "containers": [server],
        "volumes": [
            # NCCL and vLLM's workers exchange tensors through shared memory; the 64 MiB
            # container default is far too small for tensor parallelism.
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi" if gpus else "1Gi"},
            },
            {
                "name": "weights",
                "emptyDir": {"sizeLimit": f"{math.ceil(weights_gib(spec) * 1.1) + 1}Gi"},
            },
            {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
        ],
    }
    if spec.profile.node_selector:
        pod_spec["nodeSelector"] = dict(spec.profile.node_selector)
    if spec.profile.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.profile.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": spec.name,
            "namespace": namespace,
            "labels": common_labels(spec),
            "annotations": {ANNOTATION_MODEL: model_annotation(spec)},
        },
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 2,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            "selector": {"matchLabels": selector_labels(spec)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": template_labels,
                    "annotations": {ANNOTATION_MODEL: model_annotation(spec)},
                },
                "spec": pod_spec,
            },
        },
    }


def render_namespace(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": options.namespace(spec.organization_slug),
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_ORGANIZATION: spec.organization_slug,
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "v1.31",
            },
        },
    }


def render_resource_quota(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": "gpu-quota",
            "namespace": options.namespace(spec.organization_slug),
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_ORGANIZATION: spec.organization_slug,
            },
        },
        "spec": {"hard": {"requests.nvidia.com/gpu": str(spec.organization_gpu_quota)}},
    }


def render_service(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": spec.name,
            "namespace": options.namespace(spec.organization_slug),
            "labels": common_labels(spec),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_network_policy(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{spec.name}-gateway-only",
            "namespace": options.namespace(spec.organization_slug),
            "labels": common_labels(spec),
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(spec)},
            # Ingress from the gateway only; egress to DNS and the artifact store only.
            "policyTypes": ["Ingress", "Egress"],
            "egress": render_egress_rules(options),
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": options.gateway_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(options.gateway_pod_labels)},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": spec.runtime.port}],
                }
            ],
        },
    }


def _egress_block(cidr: str, excepted: tuple[str, ...]) -> dict:
    """An ipBlock with those exceptions that lie inside `cidr` (the API rejects the others)."""
    network = ipaddress.ip_network(cidr, strict=False)
    inside = []
    for text in excepted:
        exception = ipaddress.ip_network(text, strict=False)
        if (
            exception.version == network.version
            and exception != network
            and exception.subnet_of(network)
        ):
            inside.append(text)
    return {"ipBlock": {"cidr": cidr, **({"except": inside} if inside else {})}}


def render_egress_rules(options: ClusterOptions) -> list[dict]:
    """What a model pod may connect to: cluster DNS, and the artifact store (its init container
    fetches the weights). Nothing else: a model server has no business calling out, and a
    compromised one must not reach the cloud's metadata service or other tenants."""
    dns = {
        "to": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                },
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    rules = [dns]
    if options.artifact_egress_cidrs:
        rules.append(
            {
                "to": [
                    _egress_block(cidr, options.artifact_egress_except)
                    for cidr in options.artifact_egress_cidrs
                ],
                "ports": [
                    {"protocol": "TCP", "port": int(port)} for port in options.artifact_egress_ports
                ],
            }
        )
    return rules


def render_pod_disruption_budget(spec: DeploymentSpec, options: ClusterOptions) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": spec.name,
            "namespace": options.namespace(spec.organization_slug),
            "labels": common_labels(spec),
        },
        "spec": {
            # A drain takes one replica at a time; the rest keep serving.
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(spec)},
        },
    }


def render_role_binding(spec: DeploymentSpec, options: ClusterOptions) -> dict | None:
    """The worker's rights inside this organization's namespace only: its tenant ClusterRole,
    bound here. The worker holds no namespaced write cluster-wide (helm/.../rbac.yaml)."""
    if not (options.tenant_role and options.tenant_role_subject):
        return None
    prefix, _, account = options.tenant_role_subject.rpartition(":")
    account_namespace = prefix.removeprefix("system:serviceaccount:")
    if not prefix.startswith("system:serviceaccount:") or not account_namespace or not account:
        raise PermanentError(
            f"SIROCCO_K8S_TENANT_ROLE_SUBJECT {options.tenant_role_subject!r} is not "
            "system:serviceaccount:<namespace>:<name>."
        )
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": "sirocco-provisioner",
            "namespace": options.namespace(spec.organization_slug),
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_ORGANIZATION: spec.organization_slug,
            },
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": options.tenant_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": account_namespace}],
    }


def render_organization_objects(spec: DeploymentSpec, options: ClusterOptions) -> list[dict]:
    """The namespace, the worker's rights in it (before anything it writes there), its quota."""
    binding = render_role_binding(spec, options)
    return [
        render_namespace(spec, options),
        *([binding] if binding else []),
        render_resource_quota(spec, options),
    ]


def render_deployment_objects(spec: DeploymentSpec, options: ClusterOptions) -> list[dict]:
    """The per-deployment objects, in apply order (the server last, once its peers exist)."""
    return [
        render_network_policy(spec, options),
        render_service(spec, options),
        render_pod_disruption_budget(spec, options),
        render_deployment(spec, options),
    ]


def render_all(spec: DeploymentSpec, options: ClusterOptions) -> list[dict]:
    """Every object, the server Deployment annotated with a digest of them all: a cheap read of
    that one annotation tells whether the cluster has what we would apply now."""
    objects = render_organization_objects(spec, options) + render_deployment_objects(spec, options)
    digest = manifest_digest(objects)
    objects[-1]["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = digest
    return objects


def manifest_digest(objects: list[dict]) -> str:
    encoded = json.dumps(objects, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def to_yaml(objects: list[dict]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        # Multi-line strings (the init container's script) as readable literal blocks.
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(
        objects, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=100
    )
