"""The one owner of a deployment's state: every change of its status and every event it shows.

Customers' requests (deployments/services.py), the autoscaler, the gateway's scale-from-zero
call and the reconciler's observations all change a deployment through the functions below, so
that a status never changes without its event, the conditions stay Kubernetes-like (a
transition time moves only when a condition's status does), and serverless entries hear about
their pool. Callers hold the row locked (`select_for_update`) inside a transaction, except for
`scaled`, which is itself one conditional UPDATE.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from deployments.models import Deployment, DeploymentEvent, ReplicaUsage
from deployments.provisioners.base import DeploymentSpec, Observation

# Statuses in which a pass is under way or due (the stalled check looks after them).
IN_PROGRESS = (
    Deployment.Status.PENDING,
    Deployment.Status.PROVISIONING,
    Deployment.Status.SCALING,
    Deployment.Status.UPDATING,
    Deployment.Status.DELETING,
)


def event_record(
    deployment: Deployment | str, reason: str, message: str, *, warning: bool = False
) -> DeploymentEvent:
    """Add an event to a deployment's history (`deployments/{id}/events`)."""
    return DeploymentEvent.objects.create(
        deployment_id=deployment if isinstance(deployment, str) else deployment.pk,
        reason=reason,
        message=message[:2000],
        type=DeploymentEvent.Type.WARNING if warning else DeploymentEvent.Type.NORMAL,
    )


def conditions(previous, *, available: bool, progressing: tuple[bool, str, str]) -> list:
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


def _enqueue_reconcile(deployment_id) -> None:
    from deployments.tasks import reconcile_deployment

    transaction.on_commit(lambda: reconcile_deployment.delay(str(deployment_id)))


def _expect_pass(row: Deployment) -> None:
    """A pass was just enqueued for the row: the stalled check expects it by now."""
    row.next_reconcile_at = timezone.now()


# --- what customers and the platform ask for ---------------------------------------------------


def created(deployment: Deployment, *, message: str) -> None:
    """A new deployment row (saved by the caller): its event, and its first pass."""
    event_record(deployment, "Created", message)
    Deployment.objects.filter(pk=deployment.pk).update(next_reconcile_at=timezone.now())
    _enqueue_reconcile(deployment.pk)


def updated(deployment: Deployment, *, new_generation: bool, rollout: bool, message: str) -> None:
    """The customer changed the spec (the row is locked and changed, not saved yet). A new
    generation makes the reconciler act: a failed deployment is retried, a new version or
    profile rolls out (`rollout`), a new replica count scales."""
    if new_generation:
        deployment.generation += 1
        if deployment.status == Deployment.Status.FAILED:
            deployment.status = Deployment.Status.PROVISIONING
            deployment.desired_replicas = max(deployment.desired_replicas, 1)
        elif rollout:
            deployment.status = Deployment.Status.UPDATING
        elif deployment.status == Deployment.Status.READY:
            deployment.status = Deployment.Status.SCALING
        deployment.status_reason = ""
        deployment.reconcile_failures = 0
    _expect_pass(deployment)
    deployment.save()
    event_record(deployment, "Updated", message)
    _enqueue_reconcile(deployment.pk)


def deleting(deployment: Deployment, *, message: str) -> None:
    """The customer deleted it (the row is locked): the reconciler tears everything down."""
    deployment.status = Deployment.Status.DELETING
    deployment.status_reason = "Removing replicas and cluster objects."
    deployment.desired_replicas = 0
    deployment.generation += 1
    deployment.reconcile_failures = 0
    _expect_pass(deployment)
    deployment.save()
    event_record(deployment, "Deleting", message)
    _enqueue_reconcile(deployment.pk)


def scaled(
    deployment_id,
    *,
    replicas: int,
    reason: str,
    message: str,
    where: Q,
    requested: bool = False,
    now: datetime | None = None,
) -> bool:
    """Set the replica count (the autoscaler's decision, or a request arriving while none
    runs) in one conditional UPDATE, only while the row still matches `where` (the count it was
    decided from, a status that can scale). Returns whether it changed; the event and the pass
    go with the change."""
    now = now or timezone.now()
    with transaction.atomic():
        rows = Deployment.objects.filter(where, pk=deployment_id)
        values = {
            "desired_replicas": replicas,
            "generation": F("generation") + 1,
            "status": Deployment.Status.SCALING,
            "last_scaled_at": now,
            "next_reconcile_at": now,
            "updated_at": now,
        }
        if requested:
            values["scale_up_requested_at"] = now
        if not rows.update(**values):
            return False
        event_record(str(deployment_id), reason, message)
        _enqueue_reconcile(deployment_id)
    return True


# --- what the reconciler observed ----------------------------------------------------------


def fail(row: Deployment, *, reason: str, message: str) -> None:
    """Mark failed for this generation; the next pass scales it to zero (no GPU held or billed)
    until the customer changes it (PATCH) or deletes it."""
    already = row.status == Deployment.Status.FAILED and row.status_reason == message
    row.status = Deployment.Status.FAILED
    row.status_reason = message
    row.observed_generation = row.generation
    row.reconcile_failures = 0
    row.progress_phase = Deployment.Phase.NONE
    row.conditions = conditions(
        row.conditions, available=False, progressing=(False, reason, message)
    )
    row.save()
    if not already:
        event_record(row, reason, message, warning=True)
        notify_pool_members(row)


def retrying(row: Deployment, *, message: str, failures_to_fail: int) -> bool:
    """A transient error from the cluster (the row is locked). Returns False when it failed
    the deployment instead (too many in a row)."""
    row.reconcile_failures += 1
    row.last_reconciled_at = timezone.now()
    if row.reconcile_failures >= failures_to_fail and row.status != Deployment.Status.DELETING:
        fail(
            row,
            reason="ClusterUnavailable",
            message=(
                f"The cluster kept failing for {row.reconcile_failures} attempts; last error: "
                f"{message}"
            ),
        )
        return False
    if row.reconcile_failures == 1:
        event_record(row, "ClusterError", f"{message} Retrying with backoff.", warning=True)
    row.status_reason = f"Retrying after an error from the cluster: {message}"
    row.save(
        update_fields=["reconcile_failures", "last_reconciled_at", "status_reason", "updated_at"]
    )
    return True


def observed(
    row: Deployment,
    *,
    spec: DeploymentSpec,
    observation: Observation,
    same_spec: bool,
    progress: tuple[str, int],
    poll_interval: float,
    now: datetime,
) -> float | None:
    """Write what a pass saw (the row is locked): ready replicas, status, progress, conditions,
    and the events of the change. Returns when to look again (None: converged).

    The status is "ready" only while the cluster matches the spec and, unless scaled to zero,
    a replica is ready: a ready deployment whose last replica stopped answering goes back to
    "provisioning" in the same pass that saw it."""
    before = (row.status, row.status_reason)
    fields = {
        "ready_replicas": observation.ready_count,
        "reconcile_failures": 0,
        "last_reconciled_at": now,
    }
    phase, percent = progress
    requeue: float | None = poll_interval
    if row.status == Deployment.Status.FAILED and row.observed_generation >= row.generation:
        # Failed for this generation: only wait for its replicas to be gone.
        fields.update(progress_phase=Deployment.Phase.NONE, progress_percent=0)
        if not observation.replicas:
            requeue = None
    elif observation.failure and same_spec:
        row.ready_replicas = observation.ready_count
        fail(row, reason=observation.failure_reason or "Failed", message=observation.failure)
        return poll_interval
    elif observation.rolled_out and same_spec and (observation.ready_count or not spec.replicas):
        fields.update(
            status=Deployment.Status.READY,
            status_reason="",
            observed_generation=row.generation,
            progress_phase=Deployment.Phase.READY if spec.replicas else Deployment.Phase.NONE,
            progress_percent=100,
            conditions=conditions(
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
            conditions=conditions(
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
    if (row.status, row.status_reason) != before:
        _status_events(row, before, observation, spec)
    return requeue


def _status_events(
    row: Deployment, before: tuple[str, str], observation: Observation, spec: DeploymentSpec
) -> None:
    status, reason = row.status, row.status_reason
    if status == Deployment.Status.READY and before[0] != Deployment.Status.READY:
        if spec.replicas:
            event_record(
                row,
                "Ready",
                f"{observation.ready_count} of {spec.replicas} replicas ready "
                f"({spec.model_slug} {spec.model_version} on {spec.profile.name}).",
            )
        else:
            event_record(row, "ScaledToZero", "No replica runs; the next request starts one.")
        notify_pool_members(row)
    elif status == Deployment.Status.READY and before[0] == Deployment.Status.READY:
        return
    elif status == Deployment.Status.PROVISIONING and before[0] == Deployment.Status.READY:
        event_record(
            row,
            "ReplicasUnavailable",
            "No replica is ready; restarting them." + (f" {reason}" if reason else ""),
            warning=True,
        )
    elif reason and reason != before[1]:
        event_record(row, observation.waiting_reason or "Waiting", reason, warning=True)
    elif status == Deployment.Status.PROVISIONING and before[0] == Deployment.Status.PENDING:
        event_record(
            row,
            "Provisioning",
            f"Starting {spec.replicas} replica{'s' if spec.replicas != 1 else ''} of "
            f"{spec.model_slug} {spec.model_version} on {spec.profile.name}.",
        )


def deleted(row: Deployment) -> None:
    """Everything is gone from the cluster (the row is locked): close the GPU time still open,
    drop the replicas and load reports, keep the row (and its usage) for billing."""
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
    row.next_reconcile_at = None
    row.save()
    event_record(row, "Deleted", "Every replica and cluster object is gone.")


def entry_ready(row: Deployment) -> None:
    """A serverless entry whose pool can serve (the row is locked)."""
    if row.status == Deployment.Status.READY and row.observed_generation >= row.generation:
        return
    row.status = Deployment.Status.READY
    row.status_reason = ""
    row.observed_generation = row.generation
    row.progress_phase = Deployment.Phase.READY
    row.progress_percent = 100
    row.conditions = conditions(
        row.conditions, available=True, progressing=(True, "SharedPool", "")
    )
    row.save()
    model = row.model_version.model
    if row.pool_id is None:  # a partner-hosted model's entry
        event_record(row, "Ready", f"Served by {model.publisher}'s API.")
    else:
        event_record(row, "Ready", f"Served by the shared {model.slug} pool.")


def notify_pool_members(row: Deployment) -> None:
    """A pool's status changed: its serverless entries look again."""
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
