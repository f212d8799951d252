"""The `kubernetes` provisioner: server-side apply of rendered manifests through the official
client, and a translation of what the cluster reports into reasons a customer understands.

Every write is a server-side apply (PATCH, `application/apply-patch+yaml`) with field manager
`sirocco` and `force=true`: applying the same manifests twice changes nothing, so a reconcile
killed at any line is simply run again. A digest of the manifests is kept as an annotation on
the Deployment; when it matches, a pass makes no write at all.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from deployments.provisioners.base import (
    DeploymentSpec,
    Observation,
    ObservedReplica,
    PermanentError,
    Provisioner,
    TransientError,
)
from deployments.provisioners.manifests import (
    ANNOTATION_MODEL,
    ANNOTATION_SPEC_HASH,
    CONTAINER_NAME,
    FETCH_CONTAINER_NAME,
    FIELD_MANAGER,
    LABEL_DEPLOYMENT_ID,
    LABEL_ORGANIZATION,
    LABEL_REVISION,
    MANAGED_BY,
    PROGRESS_DEADLINE_SECONDS,
    ClusterOptions,
    manifest_digest,
    render_all,
    render_organization_objects,
)

logger = logging.getLogger(__name__)

APPLY_PATCH = "application/apply-patch+yaml"
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
# A replica that crashed this many times is not going to start by itself.
CRASH_RESTARTS_TO_FAIL = 3
OOM_RESTARTS_TO_FAIL = 2
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CREATING_REASONS = {"ContainerCreating", "PodInitializing"}


@dataclass(frozen=True)
class Kind:
    kind: str
    api: type
    snake: str  # as in patch_namespaced_<snake>
    plural: str
    group: str
    namespaced: bool = True


KINDS = {
    kind.kind: kind
    for kind in (
        Kind("Namespace", k8s.CoreV1Api, "namespace", "namespaces", "", namespaced=False),
        Kind("ResourceQuota", k8s.CoreV1Api, "resource_quota", "resourcequotas", ""),
        Kind("Service", k8s.CoreV1Api, "service", "services", ""),
        Kind("Pod", k8s.CoreV1Api, "pod", "pods", ""),
        Kind("Deployment", k8s.AppsV1Api, "deployment", "deployments", "apps"),
        Kind(
            "NetworkPolicy",
            k8s.NetworkingV1Api,
            "network_policy",
            "networkpolicies",
            "networking.k8s.io",
        ),
        Kind(
            "PodDisruptionBudget",
            k8s.PolicyV1Api,
            "pod_disruption_budget",
            "poddisruptionbudgets",
            "policy",
        ),
        Kind(
            "RoleBinding",
            k8s.RbacAuthorizationV1Api,
            "role_binding",
            "rolebindings",
            "rbac.authorization.k8s.io",
        ),
    )
}
# What a deployment owns in its organization's namespace (the Namespace and quota are shared).
DEPLOYMENT_KINDS = ("Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget")


def api_client_from_settings() -> k8s.ApiClient:
    """A client from SIROCCO_KUBECONFIG (and context), else in-cluster, else ~/.kube/config."""
    from django.conf import settings

    configuration = k8s.Configuration()
    if settings.SIROCCO_KUBECONFIG:
        k8s_config.load_kube_config(
            config_file=settings.SIROCCO_KUBECONFIG,
            context=settings.SIROCCO_KUBE_CONTEXT or None,
            client_configuration=configuration,
        )
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(
                context=settings.SIROCCO_KUBE_CONTEXT or None, client_configuration=configuration
            )
    # We back off ourselves (see the reconciler); one quick retry absorbs a dropped connection.
    configuration.retries = 1
    return k8s.ApiClient(configuration)


def _status_message(error: ApiException) -> str:
    try:
        return json.loads(error.body or "{}").get("message") or error.reason or str(error.status)
    except (ValueError, AttributeError):
        return error.reason or str(error.status)


class KubeClient:
    """The few calls the provisioner makes, returning plain dicts, raising our errors."""

    def __init__(self, api_client: k8s.ApiClient, *, timeout: float = 10.0):
        self.api_client = api_client
        self.timeout = timeout
        self._apis: dict[type, object] = {}

    def _method(self, kind: Kind, verb: str, *, all_namespaces: bool = False):
        api = self._apis.get(kind.api)
        if api is None:
            api = self._apis[kind.api] = kind.api(self.api_client)
        if all_namespaces:
            return getattr(api, f"list_{kind.snake}_for_all_namespaces")
        scope = "namespaced_" if kind.namespaced else ""
        return getattr(api, f"{verb}_{scope}{kind.snake}")

    def _call(self, description: str, method, *args, **kwargs) -> dict:
        try:
            response = method(
                *args, _preload_content=False, _request_timeout=self.timeout, **kwargs
            )
        except ApiException as error:
            raise _classify(error, description) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TransientError(
                f"The Kubernetes API did not answer ({description}): {error}"
            ) from error
        data = response.data
        return json.loads(data) if data else {}

    def apply(self, obj: dict) -> dict:
        kind = KINDS[obj["kind"]]
        metadata = obj["metadata"]
        args = (metadata["name"], metadata["namespace"]) if kind.namespaced else (metadata["name"],)
        return self._call(
            f"apply {kind.kind} {metadata['name']}",
            self._method(kind, "patch"),
            *args,
            obj,
            field_manager=FIELD_MANAGER,
            force=True,
            # A field the API server does not know is an error, not silently dropped.
            field_validation="Strict",
            _content_type=APPLY_PATCH,
        )

    def get(self, kind_name: str, name: str, namespace: str | None = None) -> dict | None:
        kind = KINDS[kind_name]
        args = (name, namespace) if kind.namespaced else (name,)
        try:
            return self._call(f"read {kind_name} {name}", self._method(kind, "read"), *args)
        except _NotFound:
            return None

    def list(
        self, kind_name: str, *, namespace: str | None = None, label_selector: str = ""
    ) -> list[dict]:
        kind = KINDS[kind_name]
        if kind.namespaced and namespace is None:
            method, args = self._method(kind, "list", all_namespaces=True), ()
        else:
            method = self._method(kind, "list")
            args = (namespace,) if kind.namespaced else ()
        try:
            answer = self._call(
                f"list {kind.plural}", method, *args, label_selector=label_selector or None
            )
        except _NotFound:  # the namespace is gone: nothing in it
            return []
        return answer.get("items") or []

    def delete(self, kind_name: str, name: str, namespace: str | None = None) -> bool:
        """Ask for removal (dependents in the background); False when it was already gone."""
        kind = KINDS[kind_name]
        args = (name, namespace) if kind.namespaced else (name,)
        try:
            self._call(
                f"delete {kind_name} {name}",
                self._method(kind, "delete"),
                *args,
                propagation_policy="Background",
            )
        except _NotFound:
            return False
        return True


class _NotFound(PermanentError):
    pass


def _apply_organization_objects(client: KubeClient, objects: list[dict]) -> None:
    """Apply the namespace, the worker's RoleBinding in it, then the rest. The API server's
    authorizer may take a moment to see a RoleBinding made just now: a 403 on the objects after
    it is then worth a retry, not a failed deployment."""
    bound = False
    for obj in objects:
        try:
            client.apply(obj)
        except PermanentError as error:
            if bound and "not allowed" in str(error):
                raise TransientError(
                    f"The worker's rights in {obj['metadata'].get('namespace')} are not in "
                    f"effect yet ({error}); retrying."
                ) from error
            raise
        bound = bound or obj["kind"] == "RoleBinding"


def _classify(error: ApiException, description: str) -> Exception:
    status = error.status or 0
    message = _status_message(error)
    if status == 404:
        return _NotFound(message)
    if status in (409, 429) or status >= 500 or status == 0:
        return TransientError(f"The Kubernetes API answered {status} ({description}): {message}")
    if status == 403 and "being terminated" in message:
        # Applying into a namespace that a previous deletion is still emptying.
        return TransientError(f"The namespace is still being deleted ({description}).")
    if status in (401, 403):
        return PermanentError(
            f"The platform is not allowed to {description} in the cluster ({message}). "
            "The platform team must fix the control plane's Kubernetes permissions."
        )
    return PermanentError(f"The cluster rejected {description}: {message}")


def _conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def _container_status(pod: dict, name: str, *, init: bool = False) -> dict | None:
    key = "initContainerStatuses" if init else "containerStatuses"
    for status in (pod.get("status") or {}).get(key) or []:
        if status.get("name") == name:
            return status
    return None


def replica_from_pod(pod: dict, spec: DeploymentSpec) -> ObservedReplica:
    """What a pod's status means for the customer: a phase, and if stuck, why."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = _conditions(pod)
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    ip = status.get("podIP") or ""
    scheduled = bool((pod.get("spec") or {}).get("nodeName")) or (
        (conditions.get("PodScheduled") or {}).get("status") == "True"
    )
    # What the pod runs is what its own template said: during a rolling update the old
    # ReplicaSet's pods still run (and are billed as) the previous version.
    model_slug, _, model_version = (
        (metadata.get("annotations") or {}).get(ANNOTATION_MODEL, "").partition(":")
    )
    replica = ObservedReplica(
        name=metadata.get("name", ""),
        phase="scheduling",
        ready=ready and not metadata.get("deletionTimestamp"),
        endpoint=f"http://{ip}:{spec.runtime.port}" if ip else "",
        revision=(metadata.get("labels") or {}).get(LABEL_REVISION, ""),
        model_slug=model_slug if model_version else "",
        model_version=model_version,
    )
    replica.running, replica.running_since, replica.last_run = server_runs(pod)
    replica.last_exit = last_exit(pod)
    if metadata.get("deletionTimestamp"):
        replica.phase = "terminating"
        return replica
    if not scheduled:
        unscheduled = conditions.get("PodScheduled") or {}
        if unscheduled.get("reason") == "Unschedulable":
            replica.reason = "Unschedulable"
            replica.message = (
                f"No node can run this replica yet ({_gpu_text(spec)}): "
                f"{unscheduled.get('message', 'no node fits')}"
            )
        return replica

    fetcher = _container_status(pod, FETCH_CONTAINER_NAME, init=True)
    server = _container_status(pod, CONTAINER_NAME)
    fetched = fetcher is None or (
        (fetcher.get("state") or {}).get("terminated", {}).get("exitCode") == 0
    )
    current = server if fetched else fetcher
    replica.restart_count = (server or {}).get("restartCount", 0) + (fetcher or {}).get(
        "restartCount", 0
    )
    state = (current or {}).get("state") or {}
    last_terminated = ((current or {}).get("lastState") or {}).get("terminated") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason", "")
    if reason in IMAGE_PULL_REASONS:
        replica.phase = "pulling_image"
        replica.reason = "ImagePullBackOff" if reason != "InvalidImageName" else reason
        image = (current or {}).get("image") or spec.runtime.image
        replica.message = f"Cannot pull the image {image}: {waiting.get('message', reason)}"
    elif reason == "CrashLoopBackOff" or state.get("terminated"):
        replica.phase = "crashed"
        terminated = state.get("terminated") or last_terminated
        if terminated.get("reason") == "OOMKilled":
            replica.reason = "OOMKilled"
            replica.message = (
                f"The model server ran out of memory (OOMKilled; limit "
                f"{spec.profile.memory_request}): choose a hardware profile with more memory."
            )
        else:
            replica.reason = "CrashLoopBackOff"
            what = "fetching the weights" if not fetched else "the model server"
            detail = (terminated.get("message") or "").strip().splitlines()
            replica.message = (
                f"{what[0].upper()}{what[1:]} keeps exiting (exit code "
                f"{terminated.get('exitCode', '?')})" + (f": {detail[-1]}" if detail else ".")
            )
    elif not fetched:
        # Until the server starts, the pod fetches: its images, and the weights from S3 (the
        # init container). Progress stays monotonic: "loading weights" is the server loading
        # them into memory.
        replica.phase = "pulling_image"
        if state.get("running") is not None:
            replica.message = f"Downloading the weights from {spec.artifact_uri}."
    elif reason in CREATING_REASONS or not current:
        replica.phase = "pulling_image"
    elif state.get("running") is not None:
        replica.phase = "ready" if replica.ready else "loading_weights"
    else:
        replica.phase = "pulling_image"
    if replica.phase == "ready":
        replica.reason = replica.message = ""
    return replica


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as the API server writes it (`2026-12-06T14:05:50Z`)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def server_runs(pod: dict) -> tuple[bool, datetime | None, tuple[datetime, datetime] | None]:
    """(running now, since when, the last run that ended) of the pod's model server container,
    from the kubelet's own timestamps: `state.running.startedAt`, and `startedAt`/`finishedAt`
    of `state.terminated` or `lastState.terminated`. A restart is a gap between two runs."""
    status = _container_status(pod, CONTAINER_NAME) or {}
    state = status.get("state") or {}
    running_since = parse_time((state.get("running") or {}).get("startedAt"))
    phase = (pod.get("status") or {}).get("phase")
    running = running_since is not None and phase not in ("Succeeded", "Failed")
    ended = state.get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
    started, finished = parse_time(ended.get("startedAt")), parse_time(ended.get("finishedAt"))
    last_run = (started, finished) if started and finished else None
    return running, running_since if running else None, last_run


def last_exit(pod: dict) -> str:
    """How the model server's last run ended, from its container status: `exit code 137
    (OOMKilled)`, `signal 9`, "" when it has not ended."""
    status = _container_status(pod, CONTAINER_NAME) or {}
    terminated = (status.get("state") or {}).get("terminated") or (
        (status.get("lastState") or {}).get("terminated") or {}
    )
    if not terminated:
        return ""
    if terminated.get("signal"):
        how = f"signal {terminated['signal']}"
    else:
        how = f"exit code {terminated.get('exitCode', '?')}"
    return f"{how} ({terminated['reason']})" if terminated.get("reason") else how


def _gpu_text(spec: DeploymentSpec) -> str:
    if not spec.profile.gpu_count:
        return f"{spec.profile.cpu_request} CPUs, {spec.profile.memory_request} memory"
    return f"{spec.profile.gpu_count} × {spec.profile.gpu_model or 'GPU'}"


# The most telling reason first, when several replicas are stuck for different ones.
_REASON_ORDER = ["OOMKilled", "CrashLoopBackOff", "InvalidImageName", "ImagePullBackOff"]
_REASON_ORDER += ["Unschedulable", "FailedCreate"]


def _worst(replicas: list[ObservedReplica]) -> ObservedReplica | None:
    stuck = [r for r in replicas if r.reason]
    if not stuck:
        return None
    return min(
        stuck,
        key=lambda r: _REASON_ORDER.index(r.reason) if r.reason in _REASON_ORDER else 99,
    )


class KubernetesProvisioner(Provisioner):
    name = "kubernetes"
    poll_interval = 5.0

    def __init__(self, client: KubeClient, options: ClusterOptions | None = None):
        self.client = client
        self.options = options or ClusterOptions()
        # Namespace and quota digests this process applied: an organization's ten deployments
        # need not apply the same two shared objects ten times. A namespace found missing (404
        # on an apply into it) clears its entry.
        self._organization_applied: dict[str, str] = {}

    def namespace(self, spec: DeploymentSpec) -> str:
        return self.options.namespace(spec.organization_slug)

    def apply(self, spec: DeploymentSpec, *, force: bool = False) -> None:
        self._apply(spec, force=force)

    def _apply(self, spec: DeploymentSpec, *, force: bool = False) -> tuple[dict, bool]:
        """Apply every object unless the Deployment already carries this exact digest.
        Returns the Deployment object and whether it was created just now."""
        objects = render_all(spec, self.options)
        desired = objects[-1]
        namespace = self.namespace(spec)
        current = self.client.get("Deployment", spec.name, namespace)
        if current is not None:
            owner = (current["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT_ID)
            if owner != spec.deployment_id:
                raise PermanentError(
                    f"A Deployment named {spec.name} already exists in {namespace} "
                    "and is not this deployment's; choose another name."
                )
            annotations = current["metadata"].get("annotations") or {}
            desired_hash = desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
            if not force and annotations.get(ANNOTATION_SPEC_HASH) == desired_hash:
                return current, False
        shared_count = len(render_organization_objects(spec, self.options))
        shared, own = objects[:shared_count], objects[shared_count:]
        shared_digest = manifest_digest(shared)
        if force or self._organization_applied.get(namespace) != shared_digest:
            _apply_organization_objects(self.client, shared)
            self._organization_applied[namespace] = shared_digest
        try:
            for obj in own:
                applied = self.client.apply(obj)
        except _NotFound:
            # The namespace went away behind our back: put it back, then the rest.
            self._organization_applied.pop(namespace, None)
            for obj in objects:
                applied = self.client.apply(obj)
            self._organization_applied[namespace] = shared_digest
        return applied, current is None

    def observe(self, spec: DeploymentSpec) -> Observation:
        current = self.client.get("Deployment", spec.name, self.namespace(spec))
        return self._observe(spec, current)

    def sync(self, spec: DeploymentSpec, *, force: bool = False) -> Observation:
        deployment, created = self._apply(spec, force=force)
        return self._observe(spec, deployment, created=created)

    def _observe(
        self, spec: DeploymentSpec, deployment: dict | None, *, created: bool = False
    ) -> Observation:
        # A Deployment created just now has no pods yet: no need to ask.
        pods = (
            []
            if created
            else self.client.list(
                "Pod",
                namespace=self.namespace(spec),
                label_selector=f"{LABEL_DEPLOYMENT_ID}={spec.deployment_id}",
            )
        )
        replicas = sorted(
            (replica_from_pod(pod, spec) for pod in pods), key=lambda replica: replica.name
        )
        observation = Observation(replicas=replicas)
        revision = spec.revision()
        current = [r for r in replicas if r.revision == revision and r.phase != "terminating"]
        if deployment is not None:
            status = deployment.get("status") or {}
            wanted = spec.replicas
            observation.rolled_out = (
                status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
                and status.get("updatedReplicas", 0) == wanted
                and status.get("readyReplicas", 0) == wanted
                and status.get("replicas", 0) == wanted
                and len(replicas) == wanted
                and all(r.revision == revision and r.ready for r in replicas)
            )
            conditions = _conditions(deployment)
            failure = conditions.get("ReplicaFailure") or {}
            if failure.get("status") == "True":
                # The ReplicaSet cannot create pods, e.g. the namespace's GPU quota is spent.
                observation.waiting_reason = "FailedCreate"
                observation.waiting = f"Cannot create replicas: {failure.get('message', '')}"
            progressing = conditions.get("Progressing") or {}
            if (
                progressing.get("status") == "False"
                and progressing.get("reason") == "ProgressDeadlineExceeded"
            ):
                worst = _worst(current)
                observation.failure_reason = worst.reason if worst else "ProgressDeadlineExceeded"
                observation.failure = (
                    worst.message
                    if worst
                    else f"The rollout made no progress in {PROGRESS_DEADLINE_SECONDS // 60} "
                    "minutes."
                )
        for replica in current:
            if (
                replica.reason == "OOMKilled" and replica.restart_count >= OOM_RESTARTS_TO_FAIL
            ) or (
                replica.reason == "CrashLoopBackOff"
                and replica.restart_count >= CRASH_RESTARTS_TO_FAIL
            ):
                observation.failure, observation.failure_reason = replica.message, replica.reason
                break
            if replica.reason == "InvalidImageName":
                observation.failure, observation.failure_reason = replica.message, replica.reason
                break
        worst = _worst(current)
        if worst is not None and not observation.waiting:
            observation.waiting, observation.waiting_reason = worst.message, worst.reason
        return observation

    def delete(self, spec: DeploymentSpec) -> bool:
        namespace = self.namespace(spec)
        present = self.client.get("Deployment", spec.name, namespace)
        if present is not None and (present["metadata"].get("labels") or {}).get(
            LABEL_DEPLOYMENT_ID
        ) not in (spec.deployment_id, None):
            present = None  # someone else's object of the same name: not ours to delete
        else:
            for kind in DEPLOYMENT_KINDS:
                name = spec.name if kind != "NetworkPolicy" else f"{spec.name}-gateway-only"
                self.client.delete(kind, name, namespace)
        pods = self.client.list(
            "Pod", namespace=namespace, label_selector=f"{LABEL_DEPLOYMENT_ID}={spec.deployment_id}"
        )
        if pods or (present is not None and self.client.get("Deployment", spec.name, namespace)):
            return False
        return self._delete_namespace_if_unused(namespace)

    def _delete_namespace_if_unused(self, namespace: str) -> bool:
        """The organization's namespace goes with its last deployment; True once it is gone."""
        if self.client.list("Deployment", namespace=namespace, label_selector=MANAGED_SELECTOR):
            return True  # other deployments of the organization still live there
        self._organization_applied.pop(namespace, None)
        if self.client.get("Namespace", namespace) is None:
            return True
        self.client.delete("Namespace", namespace)
        return self.client.get("Namespace", namespace) is None

    def drifted(self, specs: dict[str, DeploymentSpec], known: dict[str, dict]) -> set[str]:
        """Compare the whole cluster with the database in a handful of LIST calls."""
        by_id: dict[str, dict[str, set]] = {}
        hashes: dict[str, str] = {}
        for kind in DEPLOYMENT_KINDS:
            for obj in self.client.list(kind, label_selector=MANAGED_SELECTOR):
                labels = obj["metadata"].get("labels") or {}
                owner = labels.get(LABEL_DEPLOYMENT_ID)
                by_id.setdefault(owner, {}).setdefault("kinds", set()).add(kind)
                if kind == "Deployment":
                    annotations = obj["metadata"].get("annotations") or {}
                    hashes[owner] = annotations.get(ANNOTATION_SPEC_HASH, "")
        pods: dict[str, list[dict]] = {}
        for pod in self.client.list("Pod", label_selector=MANAGED_SELECTOR):
            owner = (pod["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT_ID)
            pods.setdefault(owner, []).append(pod)
        drifted = set()
        for deployment_id, spec in specs.items():
            objects = render_all(spec, self.options)
            desired_hash = objects[-1]["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
            kinds = by_id.get(deployment_id, {}).get("kinds", set())
            replicas = [replica_from_pod(pod, spec) for pod in pods.get(deployment_id, [])]
            expected = known.get(deployment_id, {})
            if (
                kinds != set(DEPLOYMENT_KINDS)
                or hashes.get(deployment_id) != desired_hash
                or sum(r.ready for r in replicas) != expected.get("ready")
                or {r.name for r in replicas} != expected.get("replicas")
            ):
                drifted.add(deployment_id)
        return drifted

    def orphans(self, live_ids: set[str], live_organizations: set[str]) -> list[str]:
        """Objects labelled ours whose deployment no longer exists, and namespaces of
        organizations with no deployment left: "namespace/deployment-id" or "namespace"."""
        found = []
        for kind in DEPLOYMENT_KINDS:
            for obj in self.client.list(kind, label_selector=MANAGED_SELECTOR):
                metadata = obj["metadata"]
                owner = (metadata.get("labels") or {}).get(LABEL_DEPLOYMENT_ID)
                if owner and owner not in live_ids:
                    found.append(f"{metadata['namespace']}/{owner}")
        for namespace in self.client.list("Namespace", label_selector=MANAGED_SELECTOR):
            organization = (namespace["metadata"].get("labels") or {}).get(LABEL_ORGANIZATION)
            if organization not in live_organizations:
                found.append(namespace["metadata"]["name"])
        return sorted(set(found))

    def watch(self, stop: threading.Event) -> None:
        """Follow the pods of every deployment until `stop`; each change calls on_change."""
        PodWatch(self.client, lambda deployment_id, why: self.changed(deployment_id, why)).run(stop)

    def remove_orphan(self, orphan: str) -> None:
        if "/" not in orphan:
            self._organization_applied.pop(orphan, None)
            self.client.delete("Namespace", orphan)
            return
        namespace, owner = orphan.split("/", 1)
        for kind in DEPLOYMENT_KINDS:
            for obj in self.client.list(
                kind, namespace=namespace, label_selector=f"{LABEL_DEPLOYMENT_ID}={owner}"
            ):
                self.client.delete(kind, obj["metadata"]["name"], namespace)


# --- watching pods ----------------------------------------------------------------------------
# Kept apart from the provisioner above: it runs in its own long-lived process
# (`manage.py watch_replicas`, the chart's `watcher` Deployment), not in reconcile passes.

# The API server ends a watch after this long; the loop resumes from the last resourceVersion.
WATCH_TIMEOUT_SECONDS = 300
# Changes to one deployment within this window make one reconcile request.
WATCH_COALESCE_SECONDS = 0.2
WATCH_MAX_BACKOFF_SECONDS = 30.0


class _Gone(Exception):
    """The resourceVersion a watch resumed from is too old (410 Gone): list again."""


def pod_signature(pod: dict) -> tuple:
    """What of a pod matters to a deployment's status and GPU time; a watch event that leaves
    it unchanged (a label, an annotation, a condition's probe time) asks for no pass."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    containers = []
    for key in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(key) or []:
            state = container.get("state") or {}
            containers.append(
                (
                    container.get("name"),
                    tuple(sorted(state)),
                    (state.get("running") or {}).get("startedAt"),
                    (state.get("waiting") or {}).get("reason"),
                    container.get("ready"),
                    container.get("restartCount"),
                )
            )
    return (
        status.get("phase"),
        bool(metadata.get("deletionTimestamp")),
        (pod.get("spec") or {}).get("nodeName"),
        tuple(sorted((c.get("type"), c.get("status")) for c in status.get("conditions") or [])),
        tuple(containers),
    )


def _describe_pod_change(kind: str, pod: dict) -> str:
    name = (pod.get("metadata") or {}).get("name", "?")
    if kind == "DELETED":
        return f"pod {name} deleted"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return f"pod {name} terminating"
    exit_text = last_exit(pod)
    waiting = ((_container_status(pod, CONTAINER_NAME) or {}).get("state") or {}).get(
        "waiting"
    ) or {}
    if waiting.get("reason") == "CrashLoopBackOff":
        return f"pod {name} crash-looping" + (f" ({exit_text})" if exit_text else "")
    return f"pod {name} changed"


class PodWatch:
    """Follows the pods of every deployment, as a Kubernetes informer does: LIST them (their
    resourceVersion), then WATCH from that version; a watch the server ends (its timeout) is
    resumed from the last version seen (BOOKMARK events keep it fresh); a 410 Gone (history
    compacted) means LIST again and compare. Every change that matters to a deployment (see
    `pod_signature`) calls `notify(deployment_id, why)`, coalesced per deployment over
    WATCH_COALESCE_SECONDS. Level-triggered: the reconcile pass it asks for reads the whole
    state again, so a missed or repeated event costs nothing but a pass."""

    def __init__(
        self,
        client: KubeClient,
        notify,
        *,
        timeout_seconds: int = WATCH_TIMEOUT_SECONDS,
        coalesce_seconds: float = WATCH_COALESCE_SECONDS,
    ):
        self.client = client
        self.notify = notify
        self.timeout_seconds = timeout_seconds
        self.coalesce_seconds = coalesce_seconds
        # (namespace, name) → (deployment id, signature) of every pod seen.
        self._pods: dict[tuple[str, str], tuple[str, tuple]] = {}
        self._pending: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stream = None
        self.lists = 0  # LIST calls made (a test reads it: a 410 means one more)

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set (checked between watch requests, at most `timeout_seconds`)."""
        flusher = threading.Thread(target=self._flush_until, args=(stop,), daemon=True)
        flusher.start()
        backoff = 1.0
        version = None
        while not stop.is_set():
            try:
                if version is None:
                    version = self._list(notify=bool(self.lists))
                version = self._watch(version, stop)
                backoff = 1.0
            except _Gone:
                logger.info("pod watch: resourceVersion %s expired; listing again", version)
                version = None
            except (TransientError, PermanentError, ApiException, urllib3.exceptions.HTTPError,
                    OSError, ValueError) as error:  # fmt: skip
                logger.warning("pod watch failed (%s); again in %.0f s", error, backoff)
                version = None
                stop.wait(backoff)
                backoff = min(WATCH_MAX_BACKOFF_SECONDS, backoff * 2)
        flusher.join(timeout=1)

    def _list(self, *, notify: bool) -> str:
        answer = self.client._call(
            "list pods",
            self.client._method(KINDS["Pod"], "list", all_namespaces=True),
            label_selector=MANAGED_SELECTOR,
        )
        self.lists += 1
        seen = {}
        for pod in answer.get("items") or []:
            metadata = pod.get("metadata") or {}
            key = (metadata.get("namespace"), metadata.get("name"))
            owner = (metadata.get("labels") or {}).get(LABEL_DEPLOYMENT_ID)
            if owner:
                seen[key] = (owner, pod_signature(pod))
                if notify and self._pods.get(key) != seen[key]:
                    self._queue(owner, _describe_pod_change("MODIFIED", pod))
        if notify:  # what went while no watch ran
            for key, (owner, _) in self._pods.items():
                if key not in seen:
                    self._queue(owner, f"pod {key[1]} deleted")
        self._pods = seen
        return (answer.get("metadata") or {}).get("resourceVersion") or ""

    def _watch(self, version: str, stop: threading.Event) -> str:
        from kubernetes import watch

        core = self.client._method(KINDS["Pod"], "list", all_namespaces=True)
        stream = self._stream = watch.Watch()
        try:
            for event in stream.stream(
                core,
                label_selector=MANAGED_SELECTOR,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                _request_timeout=(self.client.timeout, self.timeout_seconds + 30),
            ):
                kind, pod = event["type"], event["raw_object"]
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._seen(kind, pod)
                if stop.is_set():
                    stream.stop()
        except ApiException as error:
            if error.status == 410:
                raise _Gone() from error
            raise
        return stream.resource_version or version

    def _seen(self, kind: str, pod: dict) -> None:
        metadata = pod.get("metadata") or {}
        key = (metadata.get("namespace"), metadata.get("name"))
        owner = (metadata.get("labels") or {}).get(LABEL_DEPLOYMENT_ID)
        if not owner:
            return
        if kind == "DELETED":
            self._pods.pop(key, None)
        else:
            signature = (owner, pod_signature(pod))
            if self._pods.get(key) == signature:
                return
            self._pods[key] = signature
        self._queue(owner, _describe_pod_change(kind, pod))

    def _queue(self, deployment_id: str, why: str) -> None:
        with self._lock:
            earlier = self._pending.get(deployment_id)
            self._pending[deployment_id] = f"{earlier}; {why}" if earlier else why

    def _flush_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.coalesce_seconds):
            self.flush()
        self.flush()
        stream = self._stream
        if stream is not None:
            stream.stop()  # shuts the socket: the watch in progress ends now

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for deployment_id, why in pending.items():
            try:
                self.notify(deployment_id, why[:500])
            except Exception:  # the drift sweep still finds it
                logger.exception("could not ask for a pass of deployment %s", deployment_id)
