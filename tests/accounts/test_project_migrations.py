"""The projects migrations, from the schema before them with data in it: every organization
gets its default project, and its keys, deployments, un-ingested usage and period spend land
there (SQLite and PostgreSQL)."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from accounts.models import APIKey, Project
from billing.models import ProjectPeriodSpend
from deployments.models import Deployment
from metering.models import UsageEvent
from tests.catalog.factories import ModelVersionFactory

BEFORE = [
    ("accounts", "0002_single_sign_on"),
    ("deployments", "0005_deployment_routing_policy"),
    ("metering", "0003_usage_provider_connection"),
    ("billing", "0008_usage_record_provider_cost"),
]


def migrate(targets) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


@pytest.mark.django_db(transaction=True)
def test_existing_keys_deployments_and_usage_land_in_the_default_project():
    loader = MigrationExecutor(connection).loader
    latest = [
        node
        for app in ("accounts", "deployments", "metering", "billing")
        for node in loader.graph.leaf_nodes(app)
    ]
    version = ModelVersionFactory()
    migrate(BEFORE)
    try:
        apps = MigrationExecutor(connection).loader.project_state(BEFORE).apps
        Organization = apps.get_model("accounts", "Organization")
        OldKey = apps.get_model("accounts", "APIKey")
        OldDeployment = apps.get_model("deployments", "Deployment")
        OldEvent = apps.get_model("metering", "UsageEvent")
        OldPeriodSpend = apps.get_model("billing", "PeriodSpend")
        now = datetime(2026, 12, 1, tzinfo=UTC)
        organizations = [
            Organization.objects.create(slug=f"old-{i}", name=f"Old {i}") for i in range(2)
        ]
        for index, organization in enumerate(organizations):
            OldKey.objects.create(
                organization=organization,
                name="k",
                prefix=f"prefix{index:06d}",
                secret_hash="0" * 64,
                scopes=["inference"],
            )
            OldDeployment.objects.create(
                organization=organization, name=f"d{index}", model_version_id=version.pk
            )
            OldEvent.objects.create(
                request_id=f"req_{index}",
                organization_id=organization.pk,
                model="m",
                prompt_tokens=10,
                completion_tokens=5,
                status_code=200,
                latency_ms=1.0,
                usage_source="upstream",
                started_at=now,
                finished_at=now,
            )
            OldPeriodSpend.objects.create(
                organization=organization,
                period_start=now,
                currency="USD",
                amount=Decimal("1.25") * (index + 1),
            )
    finally:
        migrate(latest)
    for index, slug in enumerate(("old-0", "old-1")):
        default = Project.objects.get(organization__slug=slug)
        assert default.is_default and default.name == "Default"
        assert list(
            APIKey.objects.filter(organization__slug=slug).values_list("project", flat=True)
        ) == [default.pk]
        deployment = Deployment.objects.get(organization__slug=slug)
        assert (deployment.project_id, deployment.shared) == (default.pk, True)
        assert UsageEvent.objects.get(request_id=f"req_{index}").project_id == default.pk
        spend = ProjectPeriodSpend.objects.get(project=default)
        assert spend.amount == Decimal("1.25") * (index + 1)
