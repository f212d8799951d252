"""Data migrations of deployments, run on the test database (SQLite and PostgreSQL)."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from deployments.models import ReplicaUsage
from tests.deployments.factories import DeploymentFactory

BEFORE = [("deployments", "0001_initial")]


def migrate(targets) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


@pytest.mark.django_db(transaction=True)
def test_existing_gpu_time_rows_get_their_deployments_current_version():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes("deployments")
    first, second = DeploymentFactory(), DeploymentFactory()
    migrate(BEFORE)
    try:
        apps = MigrationExecutor(connection).loader.project_state(BEFORE).apps
        OldReplicaUsage = apps.get_model("deployments", "ReplicaUsage")
        for deployment, count in ((first, 2), (second, 1)):
            for index in range(count):
                OldReplicaUsage.objects.create(
                    deployment_id=deployment.pk,
                    hardware_profile_id=deployment.hardware_profile_id,
                    replica_name=f"{deployment.name}-{index}",
                    started_at=deployment.created_at,
                )
    finally:
        migrate(latest)
    assert sorted(ReplicaUsage.objects.values_list("deployment_id", "model_version_id")) == sorted(
        [(first.pk, first.model_version_id)] * 2 + [(second.pk, second.model_version_id)]
    )
