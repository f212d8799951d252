"""The usage record billing consumes: unique by request id, so a replayed write is a no-op."""

import uuid
from datetime import UTC, datetime

from metering.models import UsageEvent


def make_event(organization, request_id, **fields):
    now = datetime.now(UTC)
    values = {
        "request_id": request_id,
        "organization_id": organization.id,
        "deployment_id": uuid.uuid4(),
        "model": "tiny",
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "status_code": 200,
        "latency_ms": 12.5,
        "usage_source": UsageEvent.Source.UPSTREAM,
        "started_at": now,
        "finished_at": now,
    }
    values.update(fields)
    return UsageEvent(**values)


def test_writing_the_same_request_twice_keeps_one_row(organization):
    UsageEvent.objects.bulk_create([make_event(organization, "req_a")], ignore_conflicts=True)
    UsageEvent.objects.bulk_create(
        [make_event(organization, "req_a", prompt_tokens=99), make_event(organization, "req_b")],
        ignore_conflicts=True,
    )
    rows = dict(UsageEvent.objects.values_list("request_id", "prompt_tokens"))
    assert rows == {"req_a": 7, "req_b": 7}


def test_an_event_outlives_the_key_it_was_made_with(organization, make_api_key):
    key, _secret = make_api_key(organization)
    UsageEvent.objects.bulk_create([make_event(organization, "req_k", api_key_id=key.id)])
    key.delete()
    event = UsageEvent.objects.get(request_id="req_k")
    assert event.api_key_id is not None
    assert event.prompt_tokens + event.completion_tokens == 12


def test_the_writer_group_commits_and_ignores_replays(transactional_db, organization, tmp_path):
    import asyncio

    from gateway.usage import UsageWriter

    def fields(request_id):
        event = make_event(organization, request_id)
        return {f.attname: getattr(event, f.attname) for f in UsageEvent._meta.concrete_fields}

    async def run():
        writer = UsageWriter(spool_dir=tmp_path)
        try:
            events = [fields(f"req_{i}") for i in range(200)] + [fields("req_7")]
            return await asyncio.gather(*(writer.submit(event) for event in events))
        finally:
            await writer.close()

    assert all(asyncio.run(run()))
    assert UsageEvent.objects.count() == 200
    stored = UsageEvent.objects.get(request_id="req_7")
    assert stored.organization_id == organization.id and stored.started_at is not None


def test_the_table_has_only_the_indexes_something_reads(db):
    """Each index costs on the gateway's insert and on billing's update of every row: the
    primary key (billing's batches), the unique request_id (the gateway's ON CONFLICT), the
    partial index of what billing has not ingested and the partial index of client correlation
    ids (only rows that carry one). No varchar_pattern_ops index beside it."""
    from django.db import connection

    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, UsageEvent._meta.db_table)
    kinds = sorted(
        (
            tuple(c["columns"]),
            "primary key" if c["primary_key"] else "unique" if c["unique"] else name,
        )
        for name, c in constraints.items()
        if c["index"] or c["unique"] or c["primary_key"]
    )
    assert kinds == [
        (("id",), "primary key"),
        (("id",), "usage_not_ingested_idx"),
        (("organization_id", "client_request_id"), "usage_client_request_id_idx"),
        (("request_id",), "unique"),
    ]
