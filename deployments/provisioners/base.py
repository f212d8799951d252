"""What every provisioner takes and returns: plain data, no ORM objects.

The reconciler turns a Deployment row into a `DeploymentSpec`; a provisioner makes the world
match it (`apply`), says what it sees (`observe`), and removes it (`delete`). The same spec
renders the Kubernetes manifests, so `render_manifests` needs no database.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime


class ProvisionerError(Exception):
    """Something went wrong talking to the cluster or the machine."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TransientError(ProvisionerError):
    """Worth retrying: the API server answered 5xx/429/409, timed out, or was unreachable."""


class PermanentError(ProvisionerError):
    """Retrying will not help; the deployment fails with this message (customer-readable)."""


@dataclass(frozen=True)
class RuntimeSpec:
    name: str  # "vllm" | "builtin"
    image: str
    port: int
    health_path: str = "/health"
    readiness_path: str = "/v1/models"
    args_template: tuple[str, ...] = ()
    device: str = "gpu"


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    gpu_count: int = 0
    gpu_model: str = ""
    gpu_memory_gb: int = 0
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    node_selector: dict = field(default_factory=dict)
    tolerations: tuple = ()


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything needed to run one deployment's replicas."""

    deployment_id: str
    name: str
    organization_slug: str
    organization_gpu_quota: int
    replicas: int
    model_slug: str
    model_version: str
    served_model_name: str
    artifact_uri: str
    weights_size_bytes: int
    max_model_len: int | None
    runtime: RuntimeSpec
    profile: ProfileSpec
    runtime_args: dict = field(default_factory=dict)
    # Serverless pools are the platform's; their replicas' GPU time is not billed per second.
    billed_per_second: bool = True

    def revision(self) -> str:
        """Fingerprint of what a replica runs (not how many): it changes on a rolling update,
        never on a scale."""
        data = asdict(self)
        for volatile in ("replicas", "organization_gpu_quota", "billed_per_second"):
            data.pop(volatile)
        return _digest(data)


def _digest(data) -> str:
    encoded = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


@dataclass
class ObservedReplica:
    name: str
    phase: str  # deployments.models.Replica.Phase values
    ready: bool = False
    endpoint: str = ""
    message: str = ""
    reason: str = ""
    restart_count: int = 0
    # How its last run ended, when it restarted or stopped: "signal 9 (SIGKILL)", "exit code
    # 1 (Error)", with a line of its log where the provisioner has one.
    last_exit: str = ""
    revision: str = ""
    # The model version the replica itself runs, as DeploymentSpec names it: during a rolling
    # update old replicas still run the previous one. Empty when the replica does not say.
    model_slug: str = ""
    model_version: str = ""
    # Whether its model server runs now (the process is alive; the pod's server container is
    # running). GPU time is billed from `running_since` while it does, by the provisioner's
    # own clock (process start; the container's startedAt), not when a pass happened to look.
    running: bool = False
    running_since: datetime | None = None
    # The run before the current one (or the last one, when stopped): (started, ended), so a
    # restart between two passes still shows as a gap. None when unknown.
    last_run: tuple[datetime, datetime] | None = None
    pid: int | None = None
    port: int | None = None


@dataclass
class Observation:
    """What a provisioner saw of one deployment."""

    replicas: list[ObservedReplica] = field(default_factory=list)
    # The cluster has caught up with the spec we gave it (same revision everywhere, right count).
    rolled_out: bool = False
    # A reason the rollout cannot succeed (the deployment fails with it), or None.
    failure: str | None = None
    failure_reason: str = ""
    # Why it is still waiting, for the customer (e.g. no node has free GPUs), or "".
    waiting: str = ""
    waiting_reason: str = ""
    # Replicas that were removed (no longer in `replicas`), by name: when their server stopped,
    # where the provisioner knows it (GPU time of a replica gone between passes ends then).
    stopped_at: dict[str, datetime] = field(default_factory=dict)

    @property
    def ready_count(self) -> int:
        return sum(1 for replica in self.replicas if replica.ready)


class Provisioner:
    """The interface the reconciler drives. Every method is idempotent."""

    name = "base"
    # How soon the reconciler looks again while a rollout is in progress, in seconds.
    poll_interval = 5.0
    # Called as on_change(deployment_id, why) when the provisioner learns of a change it was not
    # asked about (a replica's process exited; a pod changed): whoever owns the reconciler wires
    # it to enqueue a pass, so failures are handled as they happen, not at the next sweep.
    on_change: Callable[[str, str], None] | None = None

    def changed(self, deployment_id: str, why: str) -> None:
        if self.on_change is not None:
            self.on_change(deployment_id, why)

    def apply(self, spec: DeploymentSpec, *, force: bool = False) -> None:
        raise NotImplementedError

    def observe(self, spec: DeploymentSpec) -> Observation:
        raise NotImplementedError

    def delete(self, spec: DeploymentSpec) -> bool:
        """Start or continue removing everything; True once all of it is gone."""
        raise NotImplementedError

    def drifted(self, specs: dict[str, DeploymentSpec], known: dict[str, dict]) -> set[str]:
        """Deployment ids whose world differs from what the database last recorded.

        `known` maps a deployment id to {"ready": int, "replicas": set of names}. Reads only:
        a steady-state sweep must make no writes.
        """
        raise NotImplementedError

    def sync(self, spec: DeploymentSpec, *, force: bool = False) -> Observation:
        """Apply, then observe (a provisioner may share reads between the two). `force` applies
        even where the provisioner believes nothing changed (after drift was found)."""
        self.apply(spec, force=force)
        return self.observe(spec)

    def watch(self, stop) -> None:
        """Follow the cluster until `stop` (a threading.Event) is set, calling on_change for
        every change (`manage.py watch_replicas`). Provisioners that learn of changes where
        they run replicas (local: the worker owns the processes) need no watch."""
        raise NotImplementedError

    def orphans(self, live_ids: set[str], live_organizations: set[str]) -> list[str]:
        """What this provisioner runs for no live deployment (to clean up)."""
        return []

    def remove_orphan(self, name: str) -> None:
        return None
