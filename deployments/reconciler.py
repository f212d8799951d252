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
import threading
import time
from datetime import datetime, timedelta

from django.db import connections, transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from catalog.models import ModelVersion
from deployments import transitions
from deployments.models import Deployment, Replica, ReplicaUsage
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

# A pass holds the deployment's lease this long and renews it while it runs (a delete that
# waits for processes to stop can take longer), so a killed worker's lease lapses within
# seconds and the stalled check (deployments.tasks.reconcile_stalled) resumes its deployment.
LEASE_SECONDS = 8.0
LEASE_RENEW_SECONDS = 2.5
# A pass asked for by a change (a replica exited) that finds the lease taken comes back this
# soon rather than being dropped: the pass in progress may have looked before the change.
BUSY_RETRY_SECONDS = 0.5
# A pass chain whose next pass is this late is broken (its worker died): the stalled check
# enqueues one. Allows for a busy broker.
CHAIN_LATE_SECONDS = 4.0
STALLED_PATIENCE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 300.0
# Transient errors in a row before the deployment fails (~20 minutes of backoff).
TRANSIENT_FAILURES_TO_FAIL = 10
PHASE_PERCENT = {"scheduling": 10, "pulling_image": 35, "loading_weights": 70, "ready": 100}
PHASE_ORDER = ["scheduling", "pulling_image", "loading_weights", "ready"]
IN_PROGRESS = transitions.IN_PROGRESS


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


class _LeaseKeeper:
    """Renews the lease of a pass that runs long, from a thread; writes nothing for a pass
    shorter than LEASE_RENEW_SECONDS (nearly all)."""

    def __init__(self, deployment_id, token: str):
        self.deployment_id, self.token = deployment_id, token
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        # Not joined: a renewal still in flight matches no row once the lease is released.
        self._done.set()

    def _run(self) -> None:
        try:
            while not self._done.wait(LEASE_RENEW_SECONDS):
                Deployment.objects.filter(pk=self.deployment_id, lease_token=self.token).update(
                    lease_expires_at=timezone.now() + timedelta(seconds=LEASE_SECONDS)
                )
        except Exception:  # the pass goes on; at worst another pass may start after it
            logger.exception("renewing the lease of deployment %s failed", self.deployment_id)
        finally:
            connections.close_all()


# --- one pass --------------------------------------------------------------------------------


def reconcile(
    deployment_id,
    *,
    provisioner: Provisioner | None = None,
    force: bool = False,
    retry_if_busy: bool = False,
    wait_if_busy: float = 0.0,
) -> float | None:
    """One reconcile pass; returns seconds until the next one, or None when converged.
    `force` re-applies everything (the sweep found the cluster drifted). `retry_if_busy`: the
    pass was asked for by a change, so if another pass holds the lease, come back shortly.
    `wait_if_busy`: first wait up to that many seconds for the lease."""
    deployment = _load(deployment_id)
    if deployment is None or deployment.status == Deployment.Status.DELETED:
        return None
    token = _take_lease(deployment.pk)
    deadline = time.monotonic() + wait_if_busy
    while token is None and time.monotonic() < deadline:
        time.sleep(0.1)
        token = _take_lease(deployment.pk)
    if token is None:
        # Another pass holds it; it will requeue itself (or the stalled check will, if it was
        # killed). A change it may not have seen gets its own pass soon after.
        return BUSY_RETRY_SECONDS if retry_if_busy else None
    requeue = None
    try:
        with _LeaseKeeper(deployment.pk, token):
            if deployment.pool_id or deployment.is_partner_entry:
                requeue = _reconcile_serverless_entry(deployment)
            else:
                requeue = _reconcile(deployment, provisioner or get_provisioner(), force=force)
    finally:
        # When the next pass is due: a chain that misses it by CHAIN_LATE_SECONDS is broken.
        Deployment.objects.filter(pk=deployment.pk, lease_token=token).update(
            lease_token="",
            lease_expires_at=None,
            next_reconcile_at=None
            if requeue is None
            else timezone.now() + timedelta(seconds=requeue),
        )
    return requeue


def _reconcile(deployment: Deployment, provisioner: Provisioner, *, force: bool) -> float | None:
    try:
        if deployment.status == Deployment.Status.DELETING:
            spec = build_spec(deployment, replicas=0, headroom=0)
            if spec.billed_per_second:
                _record_last_runs(deployment, spec, provisioner.observe(spec))
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
    if not transitions.retrying(
        row, message=error.message, failures_to_fail=TRANSIENT_FAILURES_TO_FAIL
    ):
        return provisioner.poll_interval
    return _backoff(row.reconcile_failures)


@transaction.atomic
def _record_failure(deployment: Deployment, *, reason: str, message: str) -> None:
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if row.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
        return
    transitions.fail(row, reason=reason, message=message)


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
        return transitions.observed(
            row,
            spec=spec,
            observation=observation,
            same_spec=row.generation == deployment.generation,
            progress=_progress(spec, observation),
            poll_interval=provisioner.poll_interval,
            now=now,
        )


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
                deployment=row,
                name=seen.name,
                started_at=seen.running_since or now,
                last_seen_at=now,
                **values,
            )
            continue
        if seen.restart_count > replica.restart_count:
            how = f" with {seen.last_exit}" if seen.last_exit not in ("", "it exited") else ""
            if seen.running:
                what = "restarted"
            elif seen.message:
                what = f"restarting: {seen.message}"
            else:
                what = "restarting"
            transitions.event_record(
                row,
                seen.reason or "ReplicaRestarted",
                f"Replica {seen.name} exited{how}; {what} "
                f"({seen.restart_count} restart{'s' if seen.restart_count != 1 else ''}).",
                warning=True,
            )
        if seen.running_since and seen.running_since != replica.started_at:
            values["started_at"] = seen.running_since
        changed = [name for name, value in values.items() if getattr(replica, name) != value]
        if changed:
            for name in changed:
                setattr(replica, name, values[name])
            replica.last_seen_at = now
            replica.save(update_fields=[*changed, "last_seen_at"])
    if existing:
        if row.status == Deployment.Status.READY and row.is_converged:
            # Nothing asked for it to go (no scale-down, no update): its pod was deleted or
            # its node was lost.
            for name in sorted(existing):
                transitions.event_record(
                    row,
                    "ReplicaLost",
                    f"Replica {name} is gone (its pod was deleted or its node was lost); "
                    "a replacement is starting.",
                    warning=True,
                )
        Replica.objects.filter(pk__in=[replica.pk for replica in existing.values()]).delete()


# Two start times this close are the same run (a timestamp's precision: whole seconds from
# the API server, a clock tick from /proc).
SAME_RUN_SECONDS = 1.5


def _sync_usage(
    row: Deployment,
    observation: Observation,
    now: datetime,
    *,
    spec: DeploymentSpec,
    spec_version_id: int,
) -> None:
    """One GPU-time row per observed run of each replica, with the provisioner's timestamps:
    opened at the run's start, closed at its end (or, for a replica gone between passes, when
    the provisioner says it stopped, else now). Rows of one replica never overlap."""
    open_rows = {
        usage.replica_name: usage
        for usage in ReplicaUsage.objects.filter(deployment=row, ended_at__isnull=True)
    }
    seen = {replica.name: replica for replica in observation.replicas}
    closing: list[tuple[ReplicaUsage, datetime]] = []
    missed: list[tuple[ObservedReplica, datetime, datetime]] = []
    for name, usage in open_rows.items():
        replica = seen.get(name)
        since = replica.running_since if replica is not None else None
        if (
            replica is not None
            and replica.running
            and (
                since is None or abs((since - usage.started_at).total_seconds()) <= SAME_RUN_SECONDS
            )
        ):
            continue  # the same run goes on
        if replica is None:
            end = observation.stopped_at.get(name) or now
        else:
            end, missed_run = _end_of_run(usage, replica.last_run, next_start=since, now=now)
            if missed_run is not None:
                missed.append((replica, *missed_run))
        closing.append((usage, min(max(end, usage.started_at), now)))
    for usage, end in closing:
        usage.ended_at = end
        usage.save(update_fields=["ended_at"])
        del open_rows[usage.replica_name]
    opening = [
        replica
        for replica in observation.replicas
        if replica.running and replica.name not in open_rows
    ]
    if not opening and not missed:
        return
    versions = _running_versions(
        row,
        [*opening, *(replica for replica, _, _ in missed)],
        spec=spec,
        spec_version_id=spec_version_id,
    )
    # A row never starts before the replica's previous row ended.
    previous_end = dict(
        ReplicaUsage.objects.filter(
            deployment=row,
            replica_name__in=[r.name for r in opening],
            ended_at__isnull=False,
        )
        .values("replica_name")
        .annotate(last=Max("ended_at"))
        .values_list("replica_name", "last")
    )
    rows = [
        ReplicaUsage(
            deployment=row,
            model_version_id=versions[replica.name],
            hardware_profile_id=row.hardware_profile_id,
            replica_name=replica.name,
            started_at=start,
            ended_at=end,
        )
        for replica, start, end in missed
    ]
    for replica in opening:
        start = min(replica.running_since or now, now)
        if replica.name in previous_end:
            start = max(start, previous_end[replica.name])
        rows.append(
            ReplicaUsage(
                deployment=row,
                model_version_id=versions[replica.name],
                hardware_profile_id=row.hardware_profile_id,
                replica_name=replica.name,
                started_at=start,
            )
        )
    ReplicaUsage.objects.bulk_create(rows)


def _end_of_run(
    usage: ReplicaUsage,
    last_run: tuple[datetime, datetime] | None,
    *,
    next_start: datetime | None,
    now: datetime,
) -> tuple[datetime, tuple[datetime, datetime] | None]:
    """When the run an open row stands for ended, and a whole run between it and now that no
    pass saw (start, end) if the provisioner reports one."""
    if last_run is None:
        return next_start or now, None
    started, ended = last_run
    if (started - usage.started_at).total_seconds() <= SAME_RUN_SECONDS:
        return ended, None  # the row's own run
    # Restarted more than once between two passes: the row's run ended before `started`
    # (when exactly, no one recorded; the next run's start bounds it).
    return started, (started, ended)


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
@transaction.atomic
def _record_last_runs(deployment: Deployment, spec: DeploymentSpec, observation: Observation):
    """Before a delete stops them, the replicas' runs that no pass saw (a replica restarted
    just before the delete): GPU time follows them, not the last run a pass recorded."""
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    _sync_usage(
        row, observation, timezone.now(), spec=spec, spec_version_id=deployment.model_version_id
    )


def _finish_delete(deployment: Deployment) -> None:
    row = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if row.status != Deployment.Status.DELETED:
        transitions.deleted(row)


def _reconcile_serverless_entry(deployment: Deployment) -> None:
    """A serverless entry provisions nothing: it is ready while its pool can serve (a partner
    model's entry has no pool: its provider serves it, and the gateway says when it cannot)."""
    if deployment.status == Deployment.Status.DELETING:
        _finish_delete(deployment)
        return None
    pool = deployment.pool
    with transaction.atomic():
        row = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if row.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
            return None
        if pool is not None and pool.status in (
            Deployment.Status.FAILED,
            Deployment.Status.DELETING,
            Deployment.Status.DELETED,
        ):
            message = (
                f"The shared serverless pool for {row.model_version.model.slug} is unavailable "
                f"({pool.status}); the platform team has been told."
            )
            if row.status != Deployment.Status.FAILED or row.status_reason != message:
                transitions.fail(row, reason="PoolUnavailable", message=message)
            return None
        transitions.entry_ready(row)
    return None


# --- the sweep ------------------------------------------------------------------------------


def stalled(*, now: datetime | None = None) -> list[str]:
    """Deployments whose pass chain broke: a pass is due (in progress, or a spec not yet
    observed), no pass holds the lease, and the chain's next pass is CHAIN_LATE_SECONDS late
    (its worker died with the pass, or with the countdown task it held). One indexed query, no
    write: the stalled check runs it every few seconds, and at every worker's start."""
    now = now or timezone.now()
    late = now - timedelta(seconds=CHAIN_LATE_SECONDS)
    # Rows from before next_reconcile_at was kept, or whose last pass raised (Celery retries
    # those), have none: they wait the old patience.
    patience = now - timedelta(seconds=STALLED_PATIENCE_SECONDS)
    rows = (
        Deployment.objects.filter(
            Q(status__in=IN_PROGRESS) | Q(observed_generation__lt=F("generation"))
        )
        .exclude(status=Deployment.Status.DELETED)
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .filter(
            Q(next_reconcile_at__lt=late)
            | Q(
                next_reconcile_at__isnull=True,
                last_reconciled_at__isnull=True,
                created_at__lt=late,
            )
            | Q(next_reconcile_at__isnull=True, last_reconciled_at__lt=patience)
        )
    )
    return [str(pk) for pk in rows.values_list("pk", flat=True)]


def sweep(*, provisioner: Provisioner | None = None) -> tuple[list[str], list[str]]:
    """Find what needs a reconcile pass: (stalled ids, drifted steady ids; these get a forced
    re-apply). The task enqueues them.

    Reads only: in steady state it makes no write, to the database or the cluster. Stalled
    deployments are the stalled check's (see `stalled`); steady ones come back when the cluster
    drifted from what the database recorded (a change the provisioner's watch missed).
    """
    provisioner = provisioner or get_provisioner()
    now = timezone.now()
    candidates = list(
        Deployment.objects.exclude(status=Deployment.Status.DELETED)
        .filter(pool=None, observed_generation__gte=F("generation"))
        .exclude(model_version__model__hosting="partner")  # nothing in the cluster
        .exclude(status__in=IN_PROGRESS)
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .select_related(
            "organization",
            "model_version__model",
            "model_version__serving_runtime",
            "hardware_profile",
            "serving_runtime",
        )
        .prefetch_related("replicas")
    )
    drifted: list[str] = []
    steady: dict[str, DeploymentSpec] = {}
    known: dict[str, dict] = {}
    headroom = _headroom_by_organization()
    for deployment in candidates:
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
    return stalled(now=now), drifted


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
