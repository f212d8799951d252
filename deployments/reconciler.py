"""The reconciler: make a deployment's world match its desired spec, and write back what is seen.

`reconcile(deployment_id)` is one pass. It is safe to run twice at once (a lease in the row lets
one pass in at a time, across worker processes) and safe to kill at any line: the provisioner's
writes are idempotent (server-side apply; a state file of processes), and the database is only
written in short transactions after the cluster was read. The pass returns how soon to look
again: a poll interval while a rollout is in progress, an exponential backoff after a
transient error, or None once converged (from then on the sweep watches for drift).
"""

from __future__ import annotations

import logging
import random
import secrets
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from catalog.models import ModelVersion
from deployments.models import Deployment, DeploymentEvent, Replica, ReplicaUsage
from deployments.provisioners import (
    DeploymentSpec,
    Observation,
    ObservedReplica,
    PermanentError,
    ProfileSpec,
    Provisioner,
    RuntimeSpec,
    TransientError,
    get_provisioner,
)
from deployments.selectors import max_model_len

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120
MAX_BACKOFF_SECONDS = 300.0
# Transient errors in a row before the deployment fails (~20 minutes of backoff).
TRANSIENT_FAILURES_TO_FAIL = 10
PHASE_PERCENT = {"scheduling": 10, "pulling_image": 35, "loading_weights": 70, "ready": 100}
PHASE_ORDER = ["scheduling", "pulling_image", "loading_weights", "ready"]
IN_PROGRESS = (
    Deployment.Status.PENDING,
    Deployment.Status.PROVISIONING,
    Deployment.Status.SCALING,
    Deployment.Status.UPDATING,
    Deployment.Status.DELETING,
)


# --- desired spec ------------------------------------------------------------------------------


def organization_gpu_headroom(organization_id: int) -> int:
    """GPUs of the largest replica among the organization's live deployments: the namespace's
    quota leaves room for one extra replica, the surge of a rolling update (maxUnavailable 0)."""
    largest = (
        Deployment.objects.filter(
            organization_id=organization_id, status__in=Deployment.LIVE_STATUSES
        )
        .exclude(hardware_profile=None)
        .aggregate(largest=Max("hardware_profile__gpu_count"))["largest"]
    )
    return largest or 0


def build_spec(
    deployment: Deployment, *, replicas: int | None = None, headroom: int | None = None
) -> DeploymentSpec:
    version = deployment.model_version
    runtime = deployment.serving_runtime or version.serving_runtime
    profile = deployment.hardware_profile
    if headroom is None:
        headroom = organization_gpu_headroom(deployment.organization_id)
    if replicas is None:
        replicas = (
            0 if deployment.status == Deployment.Status.FAILED else deployment.desired_replicas
        )
    return DeploymentSpec(
        deployment_id=str(deployment.pk),
        name=deployment.name,
        organization_slug=deployment.organization.slug,
        organization_gpu_quota=deployment.organization.max_gpus + headroom,
        replicas=replicas,
        model_slug=version.model.slug,
        model_version=version.version,
        served_model_name=version.served_model_name or version.model.slug,
        artifact_uri=version.artifact_uri,
        weights_size_bytes=version.size_bytes,
        max_model_len=max_model_len(version),
        runtime=RuntimeSpec(
            name=runtime.name,
            image=runtime.image,
            port=runtime.port,
            health_path=runtime.health_path,
            readiness_path=runtime.readiness_path,
            args_template=tuple(runtime.args_template or ()),
            device=runtime.device,
        ),
        profile=ProfileSpec(
            name=profile.name,
            gpu_count=profile.gpu_count,
            gpu_model=profile.gpu_model,
            gpu_memory_gb=profile.gpu_memory_gb,
            cpu_request=profile.cpu_request,
            memory_request=profile.memory_request,
            node_selector=dict(profile.node_selector or {}),
            tolerations=tuple(profile.tolerations or ()),
        ),
        runtime_args=dict(version.runtime_args or {}),
        billed_per_second=deployment.type == Deployment.Type.DEDICATED,
    )


def _load(deployment_id) -> Deployment | None:
    return (
        Deployment.objects.select_related(
            "organization",
            "model_version__model",
            "model_version__serving_runtime",
            "hardware_profile",
            "serving_runtime",
            "pool",
        )
        .filter(pk=deployment_id)
        .first()
    )


# --- the lease ------------------------------------------------------------------------------


def _take_lease(deployment_id) -> str | None:
    token = secrets.token_hex(8)
    now = timezone.now()
    taken = (
        Deployment.objects.filter(pk=deployment_id)
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .update(lease_token=token, lease_expires_at=now + timedelta(seconds=LEASE_SECONDS))
    )
    return token if taken else None


def _release_lease(deployment_id, token: str) -> None:
    Deployment.objects.filter(pk=deployment_id, lease_token=token).update(
        lease_token="", lease_expires_at=None
    )


# --- one pass --------------------------------------------------------------------------------


def reconcile(
    deployment_id, *, provisioner: Provisioner | None = None, force: bool = False
) -> float | None:
    """One reconcile pass; returns seconds until the next one, or None when converged.
    `force` re-applies everything (the sweep found the cluster drifted)."""
    deployment = _load(deployment_id)
    if deployment is None or deployment.status == Deployment.Status.DELETED:
        return None
    token = _take_lease(deployment.pk)
    if token is None:
        # Another pass holds it; it will requeue itself (or the sweep will, if it was killed).
        return None
    try:
        if deployment.pool_id:
            return _reconcile_serverless_entry(deployment)
        return _reconcile(deployment, provisioner or get_provisioner(), force=force)
    finally:
        _release_lease(deployment.pk, token)


def _reconcile(deployment: Deployment, provisioner: Provisioner, *, force: bool) -> float | None:
    try:
        if deployment.status == Deployment.Status.DELETING:
            spec = build_spec(deployment, replicas=0, headroom=0)
            if provisioner.delete(spec):
                _finish_delete(deployment)
                return None
            return provisioner.poll_interval
        spec = build_spec(deployment)
        observation = provisioner.sync(spec, force=force)
    except TransientError as error:
        return _record_transient_error(deployment, error, provisioner)
    except PermanentError as error:
        _record_failure(deployment, reason="ProvisioningFailed", message=error.message)
        return provisioner.poll_interval  # next pass releases whatever was started
    return _record_observation(deployment, spec, observation, provisioner)


def _backoff(failures: int) -> float:
    return min(MAX_BACKOFF_SECONDS, 2.0**failures) * random.uniform(0.8, 1.2)


@transaction.atomic
def _record_transient_error(
    deployment: Deployment, error: TransientError, provisioner: Provisioner
) -> float | None:
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    row.reconcile_failures += 1
    row.last_reconciled_at = timezone.now()
    if row.reconcile_failures >= TRANSIENT_FAILURES_TO_FAIL and row.status != (
        Deployment.Status.DELETING
    ):
        _fail(
            row,
            reason="ClusterUnavailable",
            message=(
                f"The cluster kept failing for {row.reconcile_failures} attempts; last error: "
                f"{error.message}"
            ),
        )
        return provisioner.poll_interval
    if row.reconcile_failures == 1:
        _event(row, "ClusterError", f"{error.message} Retrying with backoff.", warning=True)
    row.status_reason = f"Retrying after an error from the cluster: {error.message}"
    row.save(
        update_fields=["reconcile_failures", "last_reconciled_at", "status_reason", "updated_at"]
    )
    return _backoff(row.reconcile_failures)


@transaction.atomic
def _record_failure(deployment: Deployment, *, reason: str, message: str) -> None:
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if row.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
        return
    _fail(row, reason=reason, message=message)


def _fail(row: Deployment, *, reason: str, message: str) -> None:
    """Mark failed for this generation; the next pass scales it to zero (no GPU held or billed)
    until the customer changes it (PATCH) or deletes it."""
    already = row.status == Deployment.Status.FAILED and row.status_reason == message
    row.status = Deployment.Status.FAILED
    row.status_reason = message
    row.observed_generation = row.generation
    row.reconcile_failures = 0
    row.progress_phase = Deployment.Phase.NONE
    row.conditions = _conditions(
        row.conditions, available=False, progressing=(False, reason, message)
    )
    row.save()
    if not already:
        _event(row, reason, message, warning=True)
        _notify_pool_members(row)


def _event(deployment: Deployment, reason: str, message: str, *, warning: bool = False) -> None:
    DeploymentEvent.objects.create(
        deployment=deployment,
        reason=reason,
        message=message[:2000],
        type=DeploymentEvent.Type.WARNING if warning else DeploymentEvent.Type.NORMAL,
    )


def _conditions(previous, *, available: bool, progressing: tuple[bool, str, str]) -> list:
    """Kubernetes-style conditions; a condition's lastTransitionTime moves only when its
    status does."""
    now = timezone.now().isoformat()
    before = {c["type"]: c for c in previous or []}
    wanted = [
        (
            "Available",
            available,
            "MinimumReplicasAvailable" if available else "NoReplicaReady",
            "",
        ),
        ("Progressing", *progressing),
    ]
    result = []
    for kind, status, reason, message in wanted:
        text = "True" if status else "False"
        old = before.get(kind, {})
        result.append(
            {
                "type": kind,
                "status": text,
                "reason": reason,
                "message": message,
                "lastTransitionTime": old.get("lastTransitionTime", now)
                if old.get("status") == text
                else now,
            }
        )
    return result


def _progress(spec: DeploymentSpec, observation: Observation) -> tuple[str, int]:
    if spec.replicas == 0:
        return Deployment.Phase.NONE, 100
    revision = spec.revision()
    current = [
        r for r in observation.replicas if r.revision == revision and r.phase != "terminating"
    ]
    phases = [r.phase if r.phase in PHASE_ORDER else "scheduling" for r in current]
    phases += ["scheduling"] * max(0, spec.replicas - len(phases))
    phases = sorted(phases, key=PHASE_ORDER.index)[: spec.replicas]
    percent = round(sum(PHASE_PERCENT[p] for p in phases) / spec.replicas)
    return phases[0], percent


def _record_observation(
    deployment: Deployment,
    spec: DeploymentSpec,
    observation: Observation,
    provisioner: Provisioner,
) -> float | None:
    with transaction.atomic():
        row = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if row.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
            return 0.0  # deleted meanwhile: the next pass tears down
        now = timezone.now()
        _sync_replicas(row, observation, now)
        if spec.billed_per_second:
            _sync_usage(
                row, observation, now, spec=spec, spec_version_id=deployment.model_version_id
            )
        same_spec = row.generation == deployment.generation
        before = (row.status, row.status_reason)
        fields = {
            "ready_replicas": observation.ready_count,
            "reconcile_failures": 0,
            "last_reconciled_at": now,
        }
        phase, percent = _progress(spec, observation)
        requeue: float | None = provisioner.poll_interval
        if row.status == Deployment.Status.FAILED and row.observed_generation >= row.generation:
            # Failed for this generation: only wait for its replicas to be gone.
            fields.update(progress_phase=Deployment.Phase.NONE, progress_percent=0)
            if not observation.replicas:
                requeue = None
        elif observation.failure and same_spec:
            _fail(row, reason=observation.failure_reason or "Failed", message=observation.failure)
            return provisioner.poll_interval
        elif observation.rolled_out and same_spec:
            fields.update(
                status=Deployment.Status.READY,
                status_reason="",
                observed_generation=row.generation,
                progress_phase=Deployment.Phase.READY if spec.replicas else Deployment.Phase.NONE,
                progress_percent=100,
                conditions=_conditions(
                    row.conditions,
                    available=observation.ready_count > 0,
                    progressing=(
                        True,
                        "ScaledToZero" if not spec.replicas else "NewReplicasAvailable",
                        "",
                    ),
                ),
            )
            requeue = None
        else:
            status = row.status
            if status in (Deployment.Status.PENDING, Deployment.Status.FAILED) or (
                status == Deployment.Status.READY and observation.ready_count == 0
            ):
                status = Deployment.Status.PROVISIONING
            fields.update(
                status=status,
                status_reason=observation.waiting,
                progress_phase=phase,
                progress_percent=percent,
                conditions=_conditions(
                    row.conditions,
                    available=observation.ready_count > 0,
                    progressing=(
                        True,
                        observation.waiting_reason or "ReplicasUpdating",
                        observation.waiting,
                    ),
                ),
            )
            if not same_spec:
                requeue = 0.0  # the spec changed during this pass: apply the new one now
        if requeue is None and row.last_reconciled_at is not None:
            # Converged and unchanged: no write (a reconcile of a steady deployment is free).
            del fields["last_reconciled_at"]
        changed = [name for name, value in fields.items() if getattr(row, name) != value]
        if changed:
            for name in changed:
                setattr(row, name, fields[name])
            row.save(update_fields=[*changed, "updated_at"])
        after = (row.status, row.status_reason)
        if after != before:
            _status_events(row, before, observation, spec)
        return requeue


def _status_events(
    row: Deployment, before: tuple[str, str], observation: Observation, spec: DeploymentSpec
) -> None:
    status, reason = row.status, row.status_reason
    if status == Deployment.Status.READY and before[0] != Deployment.Status.READY:
        if spec.replicas:
            _event(
                row,
                "Ready",
                f"{observation.ready_count} of {spec.replicas} replicas ready "
                f"({spec.model_slug} {spec.model_version} on {spec.profile.name}).",
            )
        else:
            _event(row, "ScaledToZero", "No replica runs; the next request starts one.")
        _notify_pool_members(row)
    elif status == Deployment.Status.READY and before[0] == Deployment.Status.READY:
        return
    elif reason and reason != before[1]:
        _event(row, observation.waiting_reason or "Waiting", reason, warning=True)
    elif status == Deployment.Status.PROVISIONING and before[0] == Deployment.Status.PENDING:
        _event(
            row,
            "Provisioning",
            f"Starting {spec.replicas} replica{'s' if spec.replicas != 1 else ''} of "
            f"{spec.model_slug} {spec.model_version} on {spec.profile.name}.",
        )
    elif status == Deployment.Status.PROVISIONING and before[0] == Deployment.Status.READY:
        _event(row, "ReplicasUnavailable", "No replica is ready; restarting them.", warning=True)


def _sync_replicas(row: Deployment, observation: Observation, now: datetime) -> None:
    existing = {replica.name: replica for replica in row.replicas.all()}
    for seen in observation.replicas:
        values = {
            "endpoint": seen.endpoint,
            "ready": seen.ready,
            "phase": seen.phase,
            "message": seen.message,
            "restart_count": seen.restart_count,
            "revision": seen.revision,
            "pid": seen.pid,
            "port": seen.port,
        }
        replica = existing.pop(seen.name, None)
        if replica is None:
            Replica.objects.create(
                deployment=row, name=seen.name, started_at=now, last_seen_at=now, **values
            )
            continue
        if seen.restart_count > replica.restart_count:
            _event(
                row,
                seen.reason or "ReplicaRestarted",
                f"Replica {seen.name} restarted ({seen.restart_count} restarts): "
                f"{seen.message or 'it exited'}",
                warning=True,
            )
        changed = [name for name, value in values.items() if getattr(replica, name) != value]
        if changed:
            for name in changed:
                setattr(replica, name, values[name])
            replica.last_seen_at = now
            replica.save(update_fields=[*changed, "last_seen_at"])
    if existing:
        Replica.objects.filter(pk__in=[replica.pk for replica in existing.values()]).delete()


def _sync_usage(
    row: Deployment,
    observation: Observation,
    now: datetime,
    *,
    spec: DeploymentSpec,
    spec_version_id: int,
) -> None:
    """Open a GPU-time row when a replica takes its hardware, close it when it lets go."""
    open_rows = {
        usage.replica_name: usage
        for usage in ReplicaUsage.objects.filter(deployment=row, ended_at__isnull=True)
    }
    holding = {replica.name: replica for replica in observation.replicas if replica.holds_hardware}
    opening = [holding[name] for name in sorted(holding.keys() - open_rows.keys())]
    if opening:
        versions = _running_versions(row, opening, spec=spec, spec_version_id=spec_version_id)
        ReplicaUsage.objects.bulk_create(
            [
                ReplicaUsage(
                    deployment=row,
                    model_version_id=versions[replica.name],
                    hardware_profile_id=row.hardware_profile_id,
                    replica_name=replica.name,
                    started_at=now,
                )
                for replica in opening
            ]
        )
    gone = [usage.pk for name, usage in open_rows.items() if name not in holding]
    if gone:
        ReplicaUsage.objects.filter(pk__in=gone).update(ended_at=now)


def _running_versions(
    row: Deployment,
    replicas: list[ObservedReplica],
    *,
    spec: DeploymentSpec,
    spec_version_id: int,
) -> dict[str, int]:
    """The id of the ModelVersion each replica runs, by replica name: what the replica says
    (its pod's annotation, its process's state), not the deployment's version, which a
    rolling update changes while old replicas still run."""
    known = {(spec.model_slug, spec.model_version): spec_version_id}
    revision = spec.revision()
    wanted = {}
    for replica in replicas:
        if replica.model_version:
            wanted[replica.name] = (replica.model_slug, replica.model_version)
        elif replica.revision == revision:
            # It does not say, but it runs this very spec (the revision digests the model).
            wanted[replica.name] = (spec.model_slug, spec.model_version)
    missing = set(wanted.values()) - known.keys()
    if missing:
        condition = Q()
        for slug, version in missing:
            condition |= Q(model__slug=slug, version=version)
        known.update(
            ((slug, version), pk)
            for pk, slug, version in ModelVersion.objects.filter(condition).values_list(
                "pk", "model__slug", "version"
            )
        )
    versions = {}
    for replica in replicas:
        version_id = known.get(wanted.get(replica.name))
        if version_id is None:
            logger.warning(
                "replica %s of deployment %s: cannot tell which model version it runs (%s); "
                "its GPU time is recorded as the deployment's current version",
                replica.name,
                row.pk,
                f"{replica.model_slug}:{replica.model_version} is not in the catalog"
                if replica.model_version
                else "it does not say",
            )
            version_id = row.model_version_id
        versions[replica.name] = version_id
    return versions


@transaction.atomic
def _finish_delete(deployment: Deployment) -> None:
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if row.status == Deployment.Status.DELETED:
        return
    now = timezone.now()
    ReplicaUsage.objects.filter(deployment=row, ended_at__isnull=True).update(ended_at=now)
    row.replicas.all().delete()
    row.load_reports.all().delete()
    row.status = Deployment.Status.DELETED
    row.status_reason = ""
    row.deleted_at = now
    row.ready_replicas = 0
    row.desired_replicas = 0
    row.observed_generation = row.generation
    row.progress_phase = Deployment.Phase.NONE
    row.progress_percent = 0
    row.conditions = []
    row.save()
    _event(row, "Deleted", "Every replica and cluster object is gone.")


def _reconcile_serverless_entry(deployment: Deployment) -> None:
    """A serverless entry provisions nothing: it is ready while its pool can serve."""
    if deployment.status == Deployment.Status.DELETING:
        _finish_delete(deployment)
        return None
    pool = deployment.pool
    with transaction.atomic():
        row = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if row.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
            return None
        if pool.status in (
            Deployment.Status.FAILED,
            Deployment.Status.DELETING,
            Deployment.Status.DELETED,
        ):
            message = (
                f"The shared serverless pool for {row.model_version.model.slug} is unavailable "
                f"({pool.status}); the platform team has been told."
            )
            if row.status != Deployment.Status.FAILED or row.status_reason != message:
                _fail(row, reason="PoolUnavailable", message=message)
            return None
        if row.status != Deployment.Status.READY or row.observed_generation < row.generation:
            row.status = Deployment.Status.READY
            row.status_reason = ""
            row.observed_generation = row.generation
            row.progress_phase = Deployment.Phase.READY
            row.progress_percent = 100
            row.conditions = _conditions(
                row.conditions, available=True, progressing=(True, "SharedPool", "")
            )
            row.save()
            _event(row, "Ready", f"Served by the shared {row.model_version.model.slug} pool.")
    return None


def _notify_pool_members(row: Deployment) -> None:
    if row.type != Deployment.Type.SERVERLESS or row.pool_id:
        return
    from deployments.tasks import reconcile_deployment

    member_ids = list(
        row.members.exclude(status=Deployment.Status.DELETED).values_list("pk", flat=True)
    )
    for member_id in member_ids:
        transaction.on_commit(
            lambda member_id=member_id: reconcile_deployment.delay(str(member_id))
        )


# --- the sweep ------------------------------------------------------------------------------


def sweep(*, provisioner: Provisioner | None = None) -> tuple[list[str], list[str]]:
    """Find what needs a reconcile pass: (stalled in-progress ids, drifted steady ids; these
    get a forced re-apply). The task enqueues them.

    Reads only: in steady state it makes no write, to the database or the cluster. In-progress
    deployments whose pass chain broke (a killed worker) come back once their lease expired;
    steady ones come back when the cluster drifted from what the database recorded.
    """
    provisioner = provisioner or get_provisioner()
    now = timezone.now()
    patience = max(30.0, 3 * provisioner.poll_interval)
    candidates = list(
        Deployment.objects.exclude(status=Deployment.Status.DELETED)
        .select_related(
            "organization",
            "model_version__model",
            "model_version__serving_runtime",
            "hardware_profile",
            "serving_runtime",
        )
        .prefetch_related("replicas")
    )
    due: list[str] = []
    drifted: list[str] = []
    steady: dict[str, DeploymentSpec] = {}
    known: dict[str, dict] = {}
    headroom = _headroom_by_organization()
    for deployment in candidates:
        lease_free = deployment.lease_expires_at is None or deployment.lease_expires_at < now
        if deployment.pool_id:
            if deployment.status in IN_PROGRESS and lease_free:
                due.append(str(deployment.pk))
            continue
        if deployment.status in IN_PROGRESS or not deployment.is_converged:
            # A pass chain in backoff looks again only after its backoff; allow for it.
            waited = patience + (
                1.2 * min(MAX_BACKOFF_SECONDS, 2.0**deployment.reconcile_failures)
                if deployment.reconcile_failures
                else 0.0
            )
            if lease_free and (
                deployment.last_reconciled_at is None
                or deployment.last_reconciled_at < now - timedelta(seconds=waited)
            ):
                due.append(str(deployment.pk))
            continue
        if not lease_free:
            continue
        try:
            spec = build_spec(deployment, headroom=headroom.get(deployment.organization_id, 0))
        except PermanentError:
            continue
        steady[str(deployment.pk)] = spec
        replicas = list(deployment.replicas.all())
        known[str(deployment.pk)] = {
            "ready": sum(1 for replica in replicas if replica.ready),
            "replicas": {replica.name for replica in replicas},
        }
    if steady:
        drifted = sorted(provisioner.drifted(steady, known))
    return due, drifted


def _headroom_by_organization() -> dict[int, int]:
    rows = (
        Deployment.objects.filter(status__in=Deployment.LIVE_STATUSES)
        .exclude(hardware_profile=None)
        .values("organization_id")
        .annotate(largest=Max("hardware_profile__gpu_count"))
    )
    return {row["organization_id"]: row["largest"] or 0 for row in rows}


def find_orphans(*, provisioner: Provisioner | None = None) -> list[str]:
    """What runs in the cluster (or on this machine) for no live deployment."""
    provisioner = provisioner or get_provisioner()
    live = Deployment.objects.exclude(status=Deployment.Status.DELETED).filter(pool=None)
    live_ids = {str(pk) for pk in live.values_list("pk", flat=True)}
    organizations = set(live.values_list("organization__slug", flat=True))
    return provisioner.orphans(live_ids, organizations)
