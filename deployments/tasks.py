"""Celery tasks of the provisioning queue. Thin: ids in, the reconciler and autoscaler do the
work, and every task may run twice or be killed at any line (see deployments/reconciler.py)."""

from celery import shared_task


@shared_task(bind=True, queue="provisioning", ignore_result=True)
def reconcile_deployment(self, deployment_id: str) -> None:
    """Make one deployment's world match its desired spec, and record what is seen."""
    from deployments.reconciler import reconcile

    requeue_after = reconcile(deployment_id)
    # Eager runs (tests) do one pass; the tests and the sweep drive the rest.
    if requeue_after is not None and not self.request.is_eager:
        reconcile_deployment.apply_async((deployment_id,), countdown=requeue_after)
