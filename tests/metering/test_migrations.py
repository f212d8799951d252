"""UsageEvent moved from the gateway app to metering without moving data: rows written under the
old schema are the same rows after the migrations, on SQLite and PostgreSQL."""

from datetime import UTC, datetime

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from metering.models import UsageEvent

BEFORE = [("gateway", "0002_only_the_indexes_something_reads"), ("metering", None)]


def migrate(targets) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


@pytest.mark.django_db(transaction=True)
def test_events_written_while_the_gateway_owned_them_are_metering_events_after(organization):
    loader = MigrationExecutor(connection).loader
    latest = loader.graph.leaf_nodes("metering") + loader.graph.leaf_nodes("gateway")
    migrate(BEFORE)
    try:
        apps = MigrationExecutor(connection).loader.project_state(BEFORE[:1]).apps
        OldUsageEvent = apps.get_model("gateway", "UsageEvent")
        now = datetime(2026, 12, 1, tzinfo=UTC)
        for index in range(3):
            OldUsageEvent.objects.create(
                request_id=f"req_old_{index}",
                organization_id=organization.pk,
                model="m",
                prompt_tokens=10 + index,
                completion_tokens=5,
                status_code=200,
                latency_ms=1.0,
                usage_source="upstream",
                started_at=now,
                finished_at=now,
            )
        # As in a database made before metering existed: the content type names the gateway.
        ContentType.objects.filter(app_label="metering").delete()
        ContentType.objects.get_or_create(app_label="gateway", model="usageevent")
    finally:
        migrate(latest)
    rows = UsageEvent.objects.order_by("request_id")
    assert [(r.request_id, r.prompt_tokens, r.client_request_id) for r in rows] == [
        ("req_old_0", 10, None),
        ("req_old_1", 11, None),
        ("req_old_2", 12, None),
    ]
    assert UsageEvent._meta.db_table == "gateway_usageevent"
    ContentType.objects.clear_cache()
    assert ContentType.objects.get_for_model(UsageEvent).app_label == "metering"
    assert not ContentType.objects.filter(app_label="gateway", model="usageevent").exists()
