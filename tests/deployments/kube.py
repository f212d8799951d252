"""A Kubernetes API for tests: kmock's emulator on loopback, plus what our provisioner needs
from a real cluster and kmock leaves out, and a small simulated control loop.

On top of kmock's `KubernetesEmulator` (HTTP server, request parsing and recording, discovery,
Status errors, object storage in `kmock.objects`):

* server-side apply: PATCH with `application/apply-patch+yaml` creates or replaces the applied
  object (single field manager), keeps system metadata and status, bumps `generation` when the
  spec changes and `resourceVersion` only when something changed;
* label selectors on LIST, and cluster-wide LIST;
* WATCH (`?watch=true`), as an API server streams it: from the `resourceVersion` asked for (the
  one a LIST returned, or the last event's), ADDED / MODIFIED / DELETED events of the matching
  objects, one JSON document a line, until `timeoutSeconds`; a `resourceVersion` older than
  the kept history (`compact()` drops it, as etcd compaction does) gets an ERROR event with a
  410 Gone Status, after which a client must LIST again;
* deletion: objects go at once, pods and namespaces terminate over a tick, a namespace takes
  its contents with it, and a terminating namespace refuses new objects (403);
* injected faults: an HTTP status or a delay (a timeout) for the next N matching requests;
* a simulated control loop run by `tick()`: a Deployment controller (rolling updates with
  maxSurge 1 / maxUnavailable 0, ResourceQuota on GPUs), a scheduler (GPU capacity per node,
  node selectors, taints), and a kubelet (init container, image pull, loading, readiness, and
  injected image-pull failures, crash loops and OOM kills).

The official client talks real HTTP to it; the loop runs on a background thread, so tests and
the sync provisioner code stay synchronous.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp.web
import attrs
import jsonschema
import kmock
import yaml
from kmock._internal.k8s import KubernetesError, KubernetesObjectNotFoundError
from kubernetes_validate.utils import schema_contents
from referencing import Registry
from referencing import Resource as SchemaResource

Resource = kmock.resource

RESOURCES = {
    ("", "namespaces"): ("v1", "Namespace", False),
    ("", "resourcequotas"): ("v1", "ResourceQuota", True),
    ("", "services"): ("v1", "Service", True),
    ("", "pods"): ("v1", "Pod", True),
    ("apps", "deployments"): ("v1", "Deployment", True),
    ("networking.k8s.io", "networkpolicies"): ("v1", "NetworkPolicy", True),
    ("policy", "poddisruptionbudgets"): ("v1", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io", "rolebindings"): ("v1", "RoleBinding", True),
}
NAMESPACES = Resource("", "v1", "namespaces")
PODS = Resource("", "v1", "pods")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
QUOTAS = Resource("", "v1", "resourcequotas")
GPU = "nvidia.com/gpu"
DEPLOYMENT_LABEL = "sirocco.dev/deployment-id"
REVISION_LABEL = "sirocco.dev/revision"


def now_iso(clock: Callable[[], datetime] | None = None) -> str:
    moment = clock() if clock is not None else datetime.now(UTC)
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Node:
    name: str
    gpus: int = 8
    labels: dict = field(default_factory=dict)
    taints: list = field(default_factory=list)


@dataclass
class Fault:
    verb: str  # get, list, patch, delete, or "*"
    plural: str  # e.g. "deployments", or "*"
    status: int = 500
    times: int = 1
    delay: float = 0.0
    message: str = "injected failure"


@dataclass
class PodLife:
    """The kubelet's private memory of a pod: how far along it is."""

    stage: int = 0
    restarts: int = 0
    node: str = ""
    gpus: int = 0
    # When the fetcher and the server container started their current run (RFC 3339), as a
    # kubelet reports them: fixed for the run, not the time of each status update.
    fetcher_started: str = ""
    server_started: str = ""


@functools.cache
def schema_validator(kind: str, api_version: str):
    """A JSON-schema validator of Kubernetes 1.31 in strict mode (kubernetes-validate's schema
    files, loaded once per kind: its own `validate` reloads them on every call)."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = "kubernetes-json-schema/v1.31.0-local-strict"
    schema = schema_contents(f"{folder}/{kind.lower()}-{api}.json", "1.31")
    definitions = schema_contents(f"{folder}/_definitions.json", "1.31")
    registry = SchemaResource.from_contents(definitions) @ (
        SchemaResource.from_contents(schema) @ Registry()
    )
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def parse_selector(selector: str | None) -> list[tuple[str, str, str | None]]:
    terms = []
    for term in (selector or "").split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append(("!=", key.strip(), value.strip()))
        elif "=" in term:
            key, value = term.split("=", 1)
            terms.append(("=", key.strip().rstrip("="), value.strip().lstrip("=")))
        elif term.startswith("!"):
            terms.append(("!", term[1:], None))
        else:
            terms.append(("exists", term, None))
    return terms


def matches(labels: dict, terms) -> bool:
    for op, key, value in terms:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True


def gpu_request(pod: dict) -> int:
    total = 0
    for container in pod["spec"].get("containers", []):
        total += int((container.get("resources") or {}).get("requests", {}).get(GPU, 0))
    return total


@attrs.define(kw_only=True)
class SimulatedCluster(kmock.KubernetesEmulator):
    nodes: list = attrs.field(factory=list)
    faults: list = attrs.field(factory=list)
    # Ticks a pod spends in each stage before the next (see _kubelet).
    stage_ticks: int = 1
    # Injected pod failures by deployment (Kubernetes Deployment) name.
    pod_faults: dict = attrs.field(factory=dict)
    # Deployments whose rollout Kubernetes reports as past its progress deadline.
    past_deadline: set = attrs.field(factory=set)
    # Validate every applied object against the Kubernetes 1.31 schemas, strictly (unknown
    # fields rejected), as an API server does: 422 Invalid.
    validate_schemas: bool = True
    # The cluster's clock (timestamps it writes); a test may move it.
    clock: Callable[[], datetime] | None = None
    _index: dict = attrs.field(factory=dict, init=False)
    _lives: dict = attrs.field(factory=dict, init=False)
    # What the control loop must look at, as a real cluster's controllers follow events:
    # deployments and pods changed since the last step, pods not settled, terminations.
    _active: set = attrs.field(factory=set, init=False)
    _unsettled: set = attrs.field(factory=set, init=False)
    _terminating: set = attrs.field(factory=set, init=False)
    _owners: dict = attrs.field(factory=dict, init=False)
    _node_used: dict = attrs.field(factory=dict, init=False)
    _deployments_removed: bool = attrs.field(default=False, init=False)
    _create_failures: dict = attrs.field(factory=dict, init=False)
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _ips: itertools.count = attrs.field(factory=lambda: itertools.count(10), init=False)
    _names: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    calls: list = attrs.field(factory=list, init=False)
    # Watch history: (resourceVersion, type, resource, namespace, JSON of the object), and the
    # oldest resourceVersion a watch may still start from.
    _history: list = attrs.field(factory=list, init=False)
    _history_start: int = attrs.field(default=0, init=False)
    _watchers: list = attrs.field(factory=list, init=False)

    # --- storage --------------------------------------------------------------------------

    def _get(self, resource, namespace, name) -> dict | None:
        obj = self.objects._objects.get((resource, namespace, name))
        if obj is None or obj.deleted:
            return None
        return obj.raw

    def _put(self, resource, namespace, name, body: dict) -> dict:
        """Store a new version. `body` must be the caller's own copy (it is kept as is)."""
        key = (resource, namespace, name)
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        existing = self.objects._objects.get(key)
        added = existing is None or existing.deleted
        if existing is None:
            self.objects[resource, namespace, name] = body
        else:
            existing.create(body)
        self._record_event("ADDED" if added else "MODIFIED", resource, namespace, body)
        self._index.setdefault((resource, namespace), set()).add(name)
        if resource == DEPLOYMENTS:
            owner = body["spec"]["selector"]["matchLabels"].get(DEPLOYMENT_LABEL)
            self._owners[owner] = (namespace, name)
            self._active.add((namespace, name))
        elif resource == PODS:
            self._touch_owner(body)
            if body["metadata"].get("deletionTimestamp"):
                self._terminating.add((PODS, namespace, name))
        elif resource == NAMESPACES and body["metadata"].get("deletionTimestamp"):
            self._terminating.add((NAMESPACES, None, name))
        return body

    def _touch_owner(self, pod: dict) -> None:
        owner = self._owners.get(pod["metadata"].get("labels", {}).get(DEPLOYMENT_LABEL))
        if owner is not None:
            self._active.add(owner)

    def _remove(self, resource, namespace, name) -> None:
        obj = self.objects._objects.get((resource, namespace, name))
        if obj is not None and not obj.deleted:
            if resource == PODS:
                self._touch_owner(obj.raw)
            gone = copy.deepcopy(obj.raw)
            gone["metadata"]["resourceVersion"] = str(next(self._versions))
            obj.delete()
            self._record_event("DELETED", resource, namespace, gone)
        self._index.get((resource, namespace), set()).discard(name)
        self._terminating.discard((resource, namespace, name))
        if resource == PODS:
            self._unsettled.discard((namespace, name))
            life = self._lives.pop((namespace, name), None)
            if life is not None and life.node:
                self._node_used[life.node] -= life.gpus
        elif resource == DEPLOYMENTS:
            self._deployments_removed = True

    # --- watch ----------------------------------------------------------------------------

    def _record_event(self, kind: str, resource, namespace, body: dict) -> None:
        version = int(body["metadata"]["resourceVersion"])
        event = (version, kind, resource, namespace, json.dumps(body))
        self._history.append(event)
        if len(self._history) > 5000:
            dropped = self._history[: len(self._history) - 5000]
            del self._history[: len(dropped)]
            self._history_start = dropped[-1][0]
        for watcher in self._watchers:
            watcher.offer(event)

    def crash_loop(self, deployment_name: str) -> None:
        """From the next tick, the running pods of a Deployment crash and crash again."""
        self.pod_faults[deployment_name] = "crash"
        for pod in self._all(PODS):
            if pod["metadata"]["labels"].get("app.kubernetes.io/instance") == deployment_name:
                self._unsettled.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))

    def compact(self) -> None:
        """Forget the watch history, as etcd's compaction does: a watch resuming from an older
        resourceVersion now gets 410 Gone."""
        self._history.clear()
        self._history_start = next(self._versions)

    async def _watch(self, raw_request, resource, namespace) -> aiohttp.web.StreamResponse:
        query = raw_request.query
        terms = parse_selector(query.get("labelSelector"))
        timeout = float(query.get("timeoutSeconds") or 1800)
        since = query.get("resourceVersion") or ""
        watcher = _Watcher(resource, namespace, terms)
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        await response.prepare(raw_request)
        async with self._lock:
            if since and since != "0" and int(since) < self._history_start:
                gone = {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({self._history_start})",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                await response.write(json.dumps(gone).encode() + b"\n")
                return response
            if since and since != "0":
                for event in self._history:
                    if event[0] > int(since):
                        watcher.offer(event)
            else:  # no version: the current state first, as ADDED events
                for obj in self._all(resource, namespace):
                    watcher.offer((0, "ADDED", resource, namespace, json.dumps(obj)))
            self._watchers.append(watcher)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    kind, text = await asyncio.wait_for(watcher.queue.get(), left)
                except TimeoutError:
                    break
                await response.write(f'{{"type": "{kind}", "object": {text}}}\n'.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            async with self._lock:
                self._watchers.remove(watcher)
        return response

    def _all(self, resource, namespace=None):
        for (res, ns), names in list(self._index.items()):
            if res != resource or (namespace is not None and ns != namespace):
                continue
            for name in sorted(names):
                body = self._get(res, ns, name)
                if body is not None:
                    yield body

    def get_object(self, kind_plural: str, namespace: str | None, name: str) -> dict | None:
        for (group, plural), (version, _kind, _namespaced) in RESOURCES.items():
            if plural == kind_plural:
                return self._get(Resource(group, version, plural), namespace, name)
        raise KeyError(kind_plural)

    def list_objects(self, kind_plural: str, namespace: str | None = None) -> list[dict]:
        for (group, plural), (version, _kind, _namespaced) in RESOURCES.items():
            if plural == kind_plural:
                return list(self._all(Resource(group, version, plural), namespace))
        raise KeyError(kind_plural)

    # --- the API --------------------------------------------------------------------------

    async def __call__(self, raw_request):
        if raw_request.method == "GET" and raw_request.query.get("watch") in ("true", "1"):
            target = self._target_of_path(raw_request.path)
            if target is not None and target[2] is None:
                resource, namespace, _name = target
                await raw_request.read()
                self.calls.append(("watch", resource.group, resource.plural, namespace))
                return await self._watch(raw_request, resource, namespace)
        # kmock 0.8's path parser fails on the bare collection /api/v1/namespaces (it reads
        # "namespaces" as a namespace scope with no name): list namespaces here instead.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            await raw_request.read()
            self.calls.append(("list", "", "namespaces", None))
            async with self._lock:
                return self._json(self._list(raw_request, NAMESPACES, None, raw_request.query))
        return await super().__call__(raw_request)

    async def _handle(self, request):
        target = self._target(request)
        if target is None:
            return await super()._handle(request)
        resource, namespace, name, verb = target
        self.calls.append((verb, resource.group, resource.plural, namespace))
        async with self._lock:
            fault = self._take_fault(verb, resource.plural)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            raise KubernetesError(
                status=fault.status, reason="InjectedFault", message=fault.message, details={}
            )
        async with self._lock:
            if verb == "patch" and "apply-patch" in self._content_type(request):
                return self._json(self._apply(request, resource, namespace, name))
            if verb == "get":
                body = self._get(resource, namespace, name)
                if body is None:
                    raise KubernetesObjectNotFoundError(
                        reason="NotFound", message=f'{resource.plural} "{name}" not found'
                    )
                return self._json(body)
            if verb == "list":
                return self._json(self._list(request, resource, namespace))
            if verb == "delete":
                return self._json(self._delete(resource, namespace, name))
        return await super()._handle(request)

    @staticmethod
    def _target_of_path(path: str):
        """(resource, namespace, name) of a path to one of our resources, else None."""
        parts = path.strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2 or (group, rest[0]) not in RESOURCES:
            return None
        return Resource(group, version, rest[0]), namespace, rest[1] if len(rest) == 2 else None

    @staticmethod
    def _target(request):
        """(resource, namespace, name, verb) of a request for one of our resources, else None.
        kmock reads /api/v1/namespaces/NAME as a namespace scope; here it is the object."""
        parts = request.url.path.strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2 or (group, rest[0]) not in RESOURCES:
            return None
        resource = Resource(group, version, rest[0])
        name = rest[1] if len(rest) == 2 else None
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        if method == "GET":
            verb = "watch" if request.params.get("watch") == "true" else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(
                method.upper(), method.lower()
            )
        return resource, namespace, name, verb

    @staticmethod
    def _content_type(request) -> str:
        return {k.lower(): v for k, v in request.headers.items()}.get("content-type", "")

    @staticmethod
    def _json(body) -> aiohttp.web.Response:
        return aiohttp.web.json_response(body)

    def _take_fault(self, verb: str, plural: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.verb in (verb, "*") and fault.plural in (plural, "*"):
                fault.times -= 1
                return fault
        return None

    def _apply(self, request, resource, namespace, name) -> dict:
        if not request.params.get("fieldManager"):
            raise KubernetesError(
                status=400, reason="BadRequest", message="fieldManager is required for apply"
            )
        applied = json.loads(request.text) if request.text.lstrip().startswith("{") else None
        applied = applied if applied is not None else yaml.safe_load(request.text)
        _version, kind, namespaced = RESOURCES[(resource.group, resource.plural)]
        metadata = applied.get("metadata") or {}
        if applied.get("kind") != kind or metadata.get("name") != name:
            raise KubernetesError(
                status=400, reason="BadRequest", message="the body does not match the URL"
            )
        if self.validate_schemas:
            error = jsonschema.exceptions.best_match(
                schema_validator(kind, applied.get("apiVersion", "")).iter_errors(applied)
            )
            if error is not None:
                path = ".".join(str(part) for part in error.absolute_path)
                raise KubernetesError(
                    status=422,
                    reason="Invalid",
                    message=f'{kind} "{name}" is invalid: {path}: {error.message}',
                )
        if namespaced:
            ns = self._get(NAMESPACES, None, namespace)
            if ns is None:
                raise KubernetesObjectNotFoundError(
                    reason="NotFound", message=f'namespaces "{namespace}" not found'
                )
            if ns["metadata"].get("deletionTimestamp"):
                raise KubernetesError(
                    status=403,
                    reason="Forbidden",
                    message=f"unable to create new content in namespace {namespace} because "
                    "it is being terminated",
                )
        current = self._get(resource, namespace, name)
        if current is None:
            body = applied  # parsed from this request: ours to keep
            body["metadata"].update(
                uid=f"uid-{next(self._names)}",
                creationTimestamp=now_iso(self.clock),
                generation=1,
            )
            if kind == "Namespace":
                body["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
                body["status"] = {"phase": "Active"}
            return self._put(resource, namespace, name, body)
        body = applied
        body["metadata"] = {
            **{
                key: value
                for key, value in current["metadata"].items()
                if key not in ("labels", "annotations")
            },
            **{key: value for key, value in body["metadata"].items()},
        }
        if kind == "Namespace":
            body["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        if "status" in current:
            body["status"] = current["status"]
        if body.get("spec") != current.get("spec"):
            body["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        unchanged = {**body["metadata"], "resourceVersion": None} == {
            **current["metadata"],
            "resourceVersion": None,
        } and {k: v for k, v in body.items() if k != "metadata"} == {
            k: v for k, v in current.items() if k != "metadata"
        }
        if unchanged:
            return current  # a no-op apply writes nothing
        return self._put(resource, namespace, name, body)

    def _list(self, request, resource, namespace, params=None) -> dict:
        params = request.params if params is None else params
        terms = parse_selector(params.get("labelSelector"))
        items = [
            obj
            for obj in self._all(resource, namespace)
            if matches(obj["metadata"].get("labels") or {}, terms)
        ]
        version, kind, _ = RESOURCES[(resource.group, resource.plural)]
        return {
            "apiVersion": f"{resource.group}/{version}".lstrip("/"),
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": items,
        }

    def _delete(self, resource, namespace, name) -> dict:
        body = self._get(resource, namespace, name)
        if body is None:
            raise KubernetesObjectNotFoundError(
                reason="NotFound", message=f'{resource.plural} "{name}" not found'
            )
        if resource in (PODS, NAMESPACES):
            # Pods honour their grace period and namespaces empty themselves first: both
            # linger, marked, until the next tick.
            if not body["metadata"].get("deletionTimestamp"):
                body = copy.deepcopy(body)
                body["metadata"]["deletionTimestamp"] = now_iso(self.clock)
                if resource == NAMESPACES:
                    body["status"] = {"phase": "Terminating"}
                self._put(resource, namespace, name, body)
            return body
        self._remove(resource, namespace, name)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {}}

    # --- the control loop ----------------------------------------------------------------

    def _step(self) -> None:
        self._finish_terminations()
        self._active |= {
            key
            for key in list(self._owners.values())
            if key[1] in self.past_deadline or key[1] in self.pod_faults
        }
        for key in sorted(self._active):
            deployment = self._get(DEPLOYMENTS, *key)
            if deployment is not None:
                self._deployment_controller(deployment)
        if self._deployments_removed:
            self._collect_orphan_pods()
            self._deployments_removed = False
        self._schedule()
        self._kubelet()
        active, self._active = self._active, set()
        for key in sorted(active | self._active):
            deployment = self._get(DEPLOYMENTS, *key)
            if deployment is not None:
                self._deployment_status(deployment)

    def _finish_terminations(self) -> None:
        for resource, namespace, name in sorted(self._terminating, key=str):
            if resource == PODS:
                self._remove(PODS, namespace, name)
        for resource, _namespace, name in sorted(self._terminating, key=str):
            if resource != NAMESPACES:
                continue
            for (kind, ns), names in list(self._index.items()):
                if ns == name:
                    for item in list(names):
                        self._remove(kind, ns, item)
            self._remove(NAMESPACES, None, name)

    def _pods_of(self, deployment: dict) -> list[dict]:
        selector = deployment["spec"]["selector"]["matchLabels"]
        return [
            pod
            for pod in self._all(PODS, deployment["metadata"]["namespace"])
            if all(pod["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
        ]

    @staticmethod
    def _is_ready(pod: dict) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )

    def _terminate(self, pod: dict) -> None:
        pod = copy.deepcopy(pod)
        pod["metadata"]["deletionTimestamp"] = now_iso(self.clock)
        self._put(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], pod)

    def _deployment_controller(self, deployment: dict) -> None:
        namespace = deployment["metadata"]["namespace"]
        template = deployment["spec"]["template"]
        revision = template["metadata"]["labels"].get(REVISION_LABEL)
        wanted = deployment["spec"].get("replicas", 1)
        pods = [p for p in self._pods_of(deployment) if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in pods if p["metadata"]["labels"].get(REVISION_LABEL) == revision]
        old = [p for p in pods if p not in new]
        failure = None
        # Scale the new revision down first, the least advanced pods first.
        for pod in sorted(new, key=self._is_ready)[: max(0, len(new) - wanted)]:
            self._terminate(pod)
            new.remove(pod)
        # Surge one pod above the wanted count while old pods still serve (maxSurge 1).
        count = len(new)
        while count < wanted and count + len(old) < wanted + 1:
            failure = self._create_pod(deployment, namespace, template)
            if failure:
                break
            count += 1
        # maxUnavailable 0: an old pod goes only when enough others are ready.
        ready_new = sum(1 for p in new if self._is_ready(p))
        for pod in sorted(old, key=self._is_ready):
            ready_old = sum(1 for p in old if self._is_ready(p))
            if not self._is_ready(pod) or ready_new + ready_old - 1 >= wanted:
                self._terminate(pod)
                old.remove(pod)
        self._create_failures[deployment["metadata"]["uid"]] = failure

    def _create_pod(self, deployment: dict, namespace: str, template: dict) -> str | None:
        pod_spec = copy.deepcopy(template["spec"])
        needed = sum(
            int((c.get("resources") or {}).get("requests", {}).get(GPU, 0))
            for c in pod_spec.get("containers", [])
        )
        quota = self._get(QUOTAS, namespace, "gpu-quota")
        if quota is not None and needed:
            hard = int(quota["spec"]["hard"].get(f"requests.{GPU}", 0))
            used = sum(
                gpu_request(p)
                for p in self._all(PODS, namespace)
                if not p["metadata"].get("deletionTimestamp")
            )
            if used + needed > hard:
                return (
                    f'pods "{deployment["metadata"]["name"]}-x" is forbidden: exceeded quota: '
                    f"gpu-quota, requested: requests.{GPU}={needed}, used: requests.{GPU}={used}, "
                    f"limited: requests.{GPU}={hard}"
                )
        serial = next(self._names)
        name = f"{deployment['metadata']['name']}-{serial:05x}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{serial}",
                "labels": dict(template["metadata"].get("labels", {})),
                "annotations": dict(template["metadata"].get("annotations", {})),
                "creationTimestamp": now_iso(self.clock),
                "ownerReferences": [
                    {"kind": "ReplicaSet", "name": deployment["metadata"]["name"], "uid": "rs"}
                ],
            },
            "spec": pod_spec,
            "status": {"phase": "Pending", "conditions": []},
        }
        self._put(PODS, namespace, name, pod)
        self._lives[(namespace, name)] = PodLife(gpus=needed)
        self._unsettled.add((namespace, name))
        return None

    def _collect_orphan_pods(self) -> None:
        owners = {
            d["spec"]["selector"]["matchLabels"].get(DEPLOYMENT_LABEL)
            for d in self._all(DEPLOYMENTS)
        }
        for pod in list(self._all(PODS)):
            owner = pod["metadata"].get("labels", {}).get(DEPLOYMENT_LABEL)
            if owner not in owners and not pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)

    def _node_fits(self, node: Node, pod: dict, used: dict) -> bool:
        spec = pod["spec"]
        if any(node.labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
            return False
        tolerations = spec.get("tolerations") or []
        for taint in node.taints:
            if not any(
                t.get("key") == taint["key"]
                and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
                and t.get("effect", taint["effect"]) == taint["effect"]
                for t in tolerations
            ):
                return False
        return used.get(node.name, 0) + gpu_request(pod) <= node.gpus

    def _schedule(self) -> None:
        used = self._node_used
        for namespace, name in sorted(self._unsettled):
            life = self._lives.get((namespace, name))
            pod = self._get(PODS, namespace, name)
            if pod is None or life is None or life.node or pod["metadata"].get("deletionTimestamp"):
                continue
            pod = copy.deepcopy(pod)
            node = next((n for n in self.nodes if self._node_fits(n, pod, used)), None)
            if node is None:
                reasons = []
                if any(life.gpus > n.gpus - used.get(n.name, 0) for n in self.nodes):
                    reasons.append(f"Insufficient {GPU}")
                message = (
                    f"0/{len(self.nodes)} nodes are available: {len(self.nodes)} "
                    f"{reasons[0] if reasons else 'node(s) did not match Pod node affinity'}."
                )
                conditions = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                    }
                ]
                if pod["status"]["conditions"] == conditions:
                    continue
                pod["status"]["conditions"] = conditions
            else:
                used[node.name] = used.get(node.name, 0) + life.gpus
                life.node = node.name
                pod["spec"]["nodeName"] = node.name
                pod["status"]["podIP"] = f"10.244.{next(self._ips) % 250}.{len(used) % 250 + 2}"
                pod["status"]["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "True",
                        "lastTransitionTime": now_iso(self.clock),
                    }
                ]
            self._put(PODS, namespace, name, pod)

    def _kubelet(self) -> None:
        for namespace, name in sorted(self._unsettled):
            pod = self._get(PODS, namespace, name)
            if pod is None or not pod["spec"].get("nodeName"):
                continue
            if pod["metadata"].get("deletionTimestamp"):
                continue
            life = self._lives.setdefault((namespace, name), PodLife())
            life.stage += 1
            instance = pod["metadata"]["labels"].get("app.kubernetes.io/instance")
            fault = self.pod_faults.get(instance)
            stage = life.stage // self.stage_ticks
            server_image = pod["spec"]["containers"][0]["image"]
            init = {"name": "fetch-weights", "restartCount": 0, "image": "fetcher"}
            server = {"name": "server", "restartCount": 0, "image": server_image, "ready": False}
            ready = False
            if stage <= 1:
                init["state"] = {"waiting": {"reason": "PodInitializing"}}
                server["state"] = {"waiting": {"reason": "PodInitializing"}}
            elif stage == 2:
                life.fetcher_started = life.fetcher_started or now_iso(self.clock)
                init["state"] = {"running": {"startedAt": life.fetcher_started}}
                server["state"] = {"waiting": {"reason": "PodInitializing"}}
            else:
                init["state"] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
                if fault == "image_pull":
                    reason = "ErrImagePull" if stage % 2 else "ImagePullBackOff"
                    server["state"] = {
                        "waiting": {
                            "reason": reason,
                            "message": f'Back-off pulling image "{server_image}"',
                        }
                    }
                elif stage == 3:
                    server["state"] = {"waiting": {"reason": "ContainerCreating"}}
                elif fault in ("crash", "oom") and stage >= 4:
                    life.restarts += 1
                    terminated = (
                        {"exitCode": 137, "reason": "OOMKilled"}
                        if fault == "oom"
                        else {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "Traceback ...\nRuntimeError: CUDA error: no kernel image",
                        }
                    )
                    # Each tick is a run that started and died: seconds, as a crash loop's.
                    terminated["startedAt"] = terminated["finishedAt"] = now_iso(self.clock)
                    server["restartCount"] = life.restarts
                    server["lastState"] = {"terminated": terminated}
                    server["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
                elif stage == 4:
                    life.server_started = life.server_started or now_iso(self.clock)
                    server["state"] = {"running": {"startedAt": life.server_started}}
                else:
                    life.server_started = life.server_started or now_iso(self.clock)
                    server["state"] = {"running": {"startedAt": life.server_started}}
                    server["ready"] = ready = True
            new = copy.deepcopy(pod)
            new["status"]["phase"] = "Running" if stage >= 4 else "Pending"
            new["status"]["initContainerStatuses"] = [init]
            new["status"]["containerStatuses"] = [server]
            conditions = [c for c in new["status"]["conditions"] if c["type"] == "PodScheduled"]
            conditions.append({"type": "Ready", "status": "True" if ready else "False"})
            new["status"]["conditions"] = conditions
            if new != pod:
                self._put(PODS, namespace, name, new)
            if ready and fault is None:
                self._unsettled.discard((namespace, name))  # nothing changes from here on

    def _deployment_status(self, deployment: dict) -> None:
        revision = deployment["spec"]["template"]["metadata"]["labels"].get(REVISION_LABEL)
        pods = [p for p in self._pods_of(deployment) if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in pods if p["metadata"]["labels"].get(REVISION_LABEL) == revision]
        ready = sum(1 for p in pods if self._is_ready(p))
        wanted = deployment["spec"].get("replicas", 1)
        complete = len(new) == wanted == len(pods) and all(self._is_ready(p) for p in new)
        name = deployment["metadata"]["name"]
        conditions = [
            {
                "type": "Available",
                "status": "True" if ready >= wanted else "False",
                "reason": "MinimumReplicasAvailable"
                if ready >= wanted
                else "MinimumReplicasUnavailable",
            },
            {
                "type": "Progressing",
                "status": "False" if name in self.past_deadline and not complete else "True",
                "reason": (
                    "ProgressDeadlineExceeded"
                    if name in self.past_deadline and not complete
                    else ("NewReplicaSetAvailable" if complete else "ReplicaSetUpdated")
                ),
            },
        ]
        failure = self._create_failures.get(deployment["metadata"]["uid"])
        if failure:
            conditions.append(
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": failure,
                }
            )
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": conditions,
        }
        if deployment.get("status") != status:
            deployment = copy.deepcopy(deployment)
            deployment["status"] = status
            self._put(
                DEPLOYMENTS,
                deployment["metadata"]["namespace"],
                deployment["metadata"]["name"],
                deployment,
            )


class _Watcher:
    """One open WATCH: the events it matches, queued for its response."""

    def __init__(self, resource, namespace, terms):
        self.resource, self.namespace, self.terms = resource, namespace, terms
        self.queue: asyncio.Queue = asyncio.Queue()

    def offer(self, event) -> None:
        _version, kind, resource, namespace, text = event
        if resource != self.resource or (self.namespace and namespace != self.namespace):
            return
        labels = (json.loads(text).get("metadata") or {}).get("labels") or {}
        if matches(labels, self.terms):
            self.queue.put_nowait((kind, text))


class ClusterThread:
    """Runs a SimulatedCluster and its kmock server on a background event loop."""

    def __init__(self, cluster: SimulatedCluster):
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: kmock.Server | None = None
        self.url = ""
        self._auto: asyncio.Task | None = None

    def __enter__(self) -> ClusterThread:
        self.thread.start()

        async def start():
            await self.cluster.__aenter__()
            self.server = kmock.Server(self.cluster)
            await self.server.__aenter__()
            return str(self.server.url).rstrip("/")

        self.url = self.run(start())
        return self

    def __exit__(self, *exc) -> None:
        self.stop_auto()

        async def stop():
            await self.server.__aexit__(None, None, None)
            await self.cluster.__aexit__(None, None, None)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable, *args):
        """Run `function(*args)` on the loop, under the emulator's lock."""

        async def locked():
            async with self.cluster._lock:
                return function(*args)

        return self.run(locked())

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.call(self.cluster._step)

    def start_auto(self, interval: float = 0.05) -> None:
        """Let the control loop run by itself (for benchmarks and real-worker tests)."""

        async def loop():
            while True:
                async with self.cluster._lock:
                    self.cluster._step()
                await asyncio.sleep(interval)

        async def start():
            self._auto = asyncio.ensure_future(loop())

        self.run(start())

    def stop_auto(self) -> None:
        if self._auto is not None:
            task = self._auto

            async def cancel():
                task.cancel()

            self.run(cancel())
            self._auto = None

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "sirocco", "user": {"token": "test-token"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "sirocco"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path


def gpu_nodes(count: int = 2, gpus: int = 8) -> list[Node]:
    return [
        Node(
            name=f"gpu-node-{index}",
            gpus=gpus,
            labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB"},
            taints=[{"key": GPU, "value": "present", "effect": "NoSchedule"}],
        )
        for index in range(count)
    ]
