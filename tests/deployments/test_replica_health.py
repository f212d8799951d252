"""What the gateway reports of a replica that refused or reset a connection: no gateway routes
to it any more, and its deployment gets a reconcile pass at once."""

import pytest

from deployments.selectors import route_for
from deployments.services import replica_unhealthy_report
from tests.deployments.factories import (
    DeploymentFactory,
    ReplicaFactory,
    ServerlessDeploymentFactory,
    ServerlessPoolFactory,
)

pytestmark = pytest.mark.django_db


def test_a_failing_replica_leaves_the_route_and_its_deployment_is_reconciled(
    organization, django_capture_on_commit_callbacks, settings
):
    settings.CELERY_TASK_ALWAYS_EAGER = False  # as in production: the pass is enqueued
    deployment = DeploymentFactory(organization=organization, name="chat")
    bad = ReplicaFactory(deployment=deployment, endpoint="http://10.0.0.1:8000")
    good = ReplicaFactory(deployment=deployment, endpoint="http://10.0.0.2:8000")
    with django_capture_on_commit_callbacks() as callbacks:
        replica_unhealthy_report(
            deployment_id=deployment.pk, endpoint=bad.endpoint, why="refused the connection"
        )
    assert len(callbacks) == 1  # one reconcile pass, asked for with the reason
    route = route_for(organization_id=organization.pk, model="chat")
    assert route.replicas == [(good.name, good.endpoint)]
    with django_capture_on_commit_callbacks() as callbacks:  # again: nothing more to do
        replica_unhealthy_report(
            deployment_id=deployment.pk, endpoint=bad.endpoint, why="refused the connection"
        )
    assert callbacks == []


def test_a_serverless_entry_reports_its_pools_replica_and_nothing_else(
    organization, other_organization, django_capture_on_commit_callbacks
):
    pool = ServerlessPoolFactory()
    entry = ServerlessDeploymentFactory(organization=organization, pool=pool)
    pooled = ReplicaFactory(deployment=pool, endpoint="http://10.0.0.3:8000")
    foreign = ReplicaFactory(
        deployment=DeploymentFactory(organization=other_organization),
        endpoint="http://10.0.0.4:8000",
    )
    with django_capture_on_commit_callbacks():
        replica_unhealthy_report(deployment_id=entry.pk, endpoint=pooled.endpoint, why="reset")
        # An endpoint that is not this deployment's (or its pool's) is left alone.
        replica_unhealthy_report(deployment_id=entry.pk, endpoint=foreign.endpoint, why="reset")
    pooled.refresh_from_db()
    foreign.refresh_from_db()
    assert (pooled.ready, foreign.ready) == (False, True)
