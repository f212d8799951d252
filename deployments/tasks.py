"""Celery tasks of the provisioning queue. Thin: ids in, the reconciler and autoscaler do the
work, and every task may run twice or be killed at any line (see deployments/reconciler.py)."""

import logging

from celery import shared_task
from celery.signals import worker_init, worker_ready
from django.db import OperationalError

logger = logging.getLogger(__name__)


@shared_task(
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def reconcile_deployment(self, deployment_id: str, force: bool = False, why: str = "") -> None:
    """Make one deployment's world match its desired spec, and record what is seen. `force`
    re-applies everything (the sweep found drift); `why` says which change asked for the pass
    (a replica exited, a pod changed), and such a pass is not dropped when another one holds
    the deployment's lease: it comes back just after."""
    from deployments.reconciler import reconcile

    if why:
        logger.info("reconcile %s: %s", deployment_id, why)
    requeue_after = reconcile(deployment_id, force=force, retry_if_busy=bool(why))
    # Eager runs (tests) do one pass; the tests and the sweep drive the rest.
    if requeue_after is not None and not self.request.is_eager:
        reconcile_deployment.apply_async((deployment_id,), countdown=requeue_after)


# A change reported inside a worker process waits this long at most for a pass in progress
# (its lease) before it is queued instead.
CHANGE_PASS_WAIT_SECONDS = 2.0
_in_worker_process = False


@worker_init.connect
def _note_worker_process(**kwargs) -> None:
    global _in_worker_process
    _in_worker_process = True  # pool processes are forked from this one and inherit it


def replica_changed(deployment_id: str, why: str) -> None:
    """What provisioners call when they learn of a change by themselves (see
    Provisioner.on_change): a pass for that deployment, now.

    In a worker process (where the local provisioner's exit watch runs: it owns the replica
    processes) the pass runs on the caller's thread, as the kubelet reports a container's exit
    and readiness to the API server itself: through the queue it would wait for the broker's
    poll (the embedded SQLite broker polls once a second), twice per restart (the exit, then
    the new process answering). Elsewhere (the Kubernetes pod watcher) it is queued."""
    if not _in_worker_process:
        reconcile_deployment.delay(deployment_id, why=why)
        return
    from django.db import connection

    from deployments.reconciler import reconcile

    logger.info("reconcile %s: %s", deployment_id, why)
    try:
        requeue_after = reconcile(
            deployment_id, retry_if_busy=True, wait_if_busy=CHANGE_PASS_WAIT_SECONDS
        )
    except Exception:
        logger.warning("the pass for %s failed here; queued", deployment_id, exc_info=True)
        requeue_after = 0.0
    finally:
        connection.close()  # this thread's own connection; the thread ends soon
    if requeue_after is not None:
        reconcile_deployment.apply_async((deployment_id,), {"why": why}, countdown=requeue_after)


@shared_task
def reconcile_stalled() -> list[str]:
    """Periodic (every few seconds) and at each worker's start: resume the deployments whose
    pass chain a killed worker broke. One query; no write when there is none."""
    from deployments.reconciler import stalled

    due = stalled()
    for deployment_id in due:
        reconcile_deployment.delay(deployment_id)
    if due:
        logger.info("resuming %d stalled deployments", len(due))
    return due


@worker_ready.connect
def _resume_on_worker_start(sender=None, **kwargs) -> None:
    # A worker that (re)starts resumes what a dead one left, and restores replicas that
    # stopped while none ran (make run stopped them), without waiting for beat.
    if "provisioning" in {queue.name for queue in sender.app.amqp.queues.consume_from.values()}:
        reconcile_stalled.delay()
        reconcile_sweep.delay()


@shared_task
def reconcile_sweep() -> list[str]:
    """Periodic: re-reconcile what drifted or stalled, and clean up what nothing owns."""
    from deployments.reconciler import find_orphans, sweep

    stalled, drifted = sweep()
    for deployment_id in stalled:
        reconcile_deployment.delay(deployment_id)
    for deployment_id in drifted:
        reconcile_deployment.delay(deployment_id, force=True)
    for orphan in find_orphans():
        remove_orphan.delay(orphan)
    if stalled or drifted:
        logger.info("sweep: %d stalled and %d drifted deployments", len(stalled), len(drifted))
    return stalled + drifted


@shared_task
def remove_orphan(orphan: str) -> None:
    """Remove what runs for no deployment (e.g. objects left by a deployment deleted while the
    cluster was unreachable). Checks again first: it may have been adopted meanwhile."""
    from deployments.provisioners import get_provisioner
    from deployments.reconciler import find_orphans

    if orphan in find_orphans():
        get_provisioner().remove_orphan(orphan)


@shared_task
def autoscale_tick() -> int:
    """Periodic: set replica counts from the gateway's load reports."""
    from deployments.autoscaler import autoscale

    return len(autoscale())
