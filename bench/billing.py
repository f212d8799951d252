"""Billing on PostgreSQL: ingest rate of usage events, and the time to close a large period.

    python bench/billing.py [--events 1000000] [--ledger-rows 10000000] [--organizations 1000]

Uses its own database (`bench_billing` on postgres://postgres@127.0.0.1:5432, dropped and made
again each run; --postgres to point elsewhere), migrated like production.
1. Ingest: --events gateway usage events of the current month, in time order as the gateway
   writes them (round-robin over the organizations, each of which calls all ten priced model
   versions, half of which change price mid-month), are written straight into the gateway's table; then `usage_events_ingest` runs batch after batch, as the billing
   worker does, until the backlog is empty. Reports events/s (goal: at least 20,000).
2. Close: --ledger-rows ledger rows of the previous month for the same organizations are
   written with SQL (rated with the same formula), their rollups built by one GROUP BY, and the
   table analyzed, as autovacuum would have; then `billing_period_close` finalizes an invoice
   per organization. Reports the seconds (goal: under 60). Then reconciles the period (ledger
   vs invoices vs rollups) to show the invoices are right, and reports that time too.
Besides wall time, ingestion reports CPU time (this process plus its PostgreSQL backend, read
from /proc), because the machine these figures come from is shared: wall time there measures
the neighbours as much as the code. (Closing may use parallel workers, which that would miss.)
Prints a table and writes bench/results/billing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--ledger-rows", type=int, default=10_000_000)
    parser.add_argument("--organizations", type=int, default=1000)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--database", default="bench_billing")
    parser.add_argument("--batch-size", type=int, default=None)
    return parser.parse_args()


def recreate_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')


def setup_django(args) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
            "DATABASE_URL": f"{args.postgres}/{args.database}",
            "SECRET_KEY": "bench-only",
            "CELERY_TASK_ALWAYS_EAGER": "true",
            "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
            "STRIPE_API_KEY": "",
            "LOG_LEVEL": "WARNING",
            "SIROCCO_VAR_DIR": tempfile.mkdtemp(prefix="bench-billing-"),
        }
    )
    if args.batch_size:
        os.environ["BILLING_INGEST_BATCH_SIZE"] = str(args.batch_size)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def seed(organizations: int, now):
    """Organizations and ten model versions priced since 2000; five change price mid-month."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from accounts.models import Organization
    from billing.periods import period_containing
    from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory

    Organization.objects.bulk_create(
        [Organization(slug=f"bench-{i:04d}", name=f"Bench {i}") for i in range(organizations)]
    )
    org_ids = list(Organization.objects.order_by("id").values_list("id", flat=True))
    month = period_containing(now)
    versions = []
    for index in range(10):
        version = ModelVersionFactory()
        first = TokenPriceFactory(
            model_version=version,
            input_per_million=Decimal("0.100000") * (index + 1),
            output_per_million=Decimal("0.300000") * (index + 1),
            effective_from=datetime(2000, 1, 1, tzinfo=UTC),
        )
        if index % 2:
            TokenPriceFactory(
                model_version=version,
                input_per_million=first.input_per_million * 2,
                output_per_million=first.output_per_million * 2,
                effective_from=month.start + (now - month.start) / 2,
            )
        versions.append((version.pk, first))
    return org_ids, versions


def write_events(count: int, org_ids, versions, now) -> None:
    from django.db import connection

    from billing.periods import period_containing
    from metering.models import UsageEvent

    month = period_containing(now)
    span = max(1, int((now - month.start).total_seconds()) - 1)
    table = UsageEvent._meta.db_table
    version_ids = [pk for pk, _ in versions]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} (request_id, organization_id, api_key_id, deployment_id,
                model_version_id, deployment_type, model, prompt_tokens, completion_tokens,
                cached_tokens, status_code, latency_ms, ttft_ms, usage_source, started_at,
                finished_at, ingested_at)
            SELECT 'bench-' || g, (%(orgs)s::bigint[])[1 + g %% %(n_orgs)s], NULL, NULL,
                (%(versions)s::bigint[])[1 + (g / %(n_orgs)s) %% 10], 'serverless', 'bench-model',
                1 + (g * 7919) %% 4000, 1 + (g * 104729) %% 1000, 0, 200, 100.0, 20.0,
                'upstream',
                %(start)s + (g * %(span)s / %(count)s) * interval '1 second',
                %(start)s + (g * %(span)s / %(count)s + 1) * interval '1 second',
                NULL
            FROM generate_series(1::bigint, %(count)s::bigint) AS g
            """,
            {
                "orgs": org_ids,
                "n_orgs": len(org_ids),
                "versions": version_ids,
                "start": month.start,
                "span": span,
                "count": count,
            },
        )
        cursor.execute(f"ANALYZE {table}")


def cpu_seconds() -> float:
    """CPU time of this process and of its PostgreSQL backend (same machine), in seconds."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    backend = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time() + backend


def bench_ingest(count: int) -> dict:
    from django.db.models import Sum

    from billing.ledger import usage_events_ingest
    from billing.models import UsageRecord, UsageRollup

    started, cpu = time.perf_counter(), cpu_seconds()
    taken = batches = 0
    while True:
        n = usage_events_ingest()
        if not n:
            break
        taken += n
        batches += 1
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    ledger = UsageRecord.objects.aggregate(n=Sum("input_tokens") + Sum("output_tokens"))
    rollups = UsageRollup.objects.aggregate(n=Sum("input_tokens") + Sum("output_tokens"))
    assert taken == count == UsageRecord.objects.count(), (taken, count)
    assert ledger["n"] == rollups["n"], "rollups differ from the ledger"
    return {
        "events": taken,
        "batches": batches,
        "seconds": round(seconds, 2),
        "events_per_second": round(taken / seconds),
        "cpu_seconds": round(cpu, 2),
        "events_per_cpu_second": round(taken / cpu),
    }


def write_ledger(rows: int, org_ids, versions, period) -> None:
    """The previous month's ledger, as ingestion would have written it, straight in SQL."""
    from django.db import connection

    from billing.models import UsageRecord, UsageRollup

    span = int((period.end - period.start).total_seconds())
    table = UsageRecord._meta.db_table
    chunk = 1_000_000
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE bench_prices (idx int, version_id bigint, price_id bigint, "
            "p_in numeric, p_out numeric)"
        )
        for index, (version_id, price) in enumerate(versions):
            cursor.execute(
                "INSERT INTO bench_prices VALUES (%s, %s, %s, %s, %s)",
                [index, version_id, price.pk, price.input_per_million, price.output_per_million],
            )
        for first in range(1, rows + 1, chunk):
            last = min(rows, first + chunk - 1)
            cursor.execute(
                f"""
                INSERT INTO {table} (request_id, organization_id, period_start, occurred_at,
                    api_key_id, deployment_id, model_version_id, deployment_type, model,
                    input_tokens, output_tokens, cached_tokens, currency, token_price_id,
                    input_price_per_million, output_price_per_million, amount, ingested_at)
                SELECT 'history-' || g, (%(orgs)s::bigint[])[1 + g %% %(n_orgs)s],
                    %(start)s, %(start)s + ((g * 2654435761) %% %(span)s) * interval '1 second',
                    NULL, NULL, p.version_id, 'serverless', 'bench-model',
                    t.i, t.o, 0, 'USD', p.price_id, p.p_in, p.p_out,
                    (t.i * p.p_in + t.o * p.p_out) / 1000000, now()
                FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
                CROSS JOIN LATERAL (
                    SELECT 1 + (g * 7919) %% 4000 AS i, 1 + (g * 104729) %% 1000 AS o
                ) AS t
                JOIN bench_prices p ON p.idx = (g / %(n_orgs)s) %% 10
                """,
                {
                    "orgs": org_ids,
                    "n_orgs": len(org_ids),
                    "start": period.start,
                    "span": span,
                    "first": first,
                    "last": last,
                },
            )
            print(f"  ledger rows written: {last:,}", flush=True)
        rollup = UsageRollup._meta.db_table
        cursor.execute(
            f"""
            INSERT INTO {rollup} (period_start, day, organization_id, model_version_id,
                deployment_id, api_key_id, currency, input_price_per_million,
                output_price_per_million, requests, input_tokens, output_tokens, cached_tokens)
            SELECT period_start, (occurred_at AT TIME ZONE 'UTC')::date, organization_id,
                COALESCE(model_version_id, 0), COALESCE(deployment_id::text, ''),
                COALESCE(api_key_id, 0), currency, input_price_per_million,
                output_price_per_million, count(*), sum(input_tokens), sum(output_tokens),
                sum(cached_tokens)
            FROM {table} WHERE period_start = %s
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
            """,
            [period.start],
        )
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {table}")


def bench_close(period) -> dict:
    from billing.invoicing import billing_period_close
    from billing.models import Invoice
    from billing.reconcile import reconcile_period

    started = time.perf_counter()
    result = billing_period_close(period_start=period.start)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = reconcile_period(period, check_stripe=False)
    reconcile_seconds = time.perf_counter() - started
    assert not report.differences, report.differences[:5]
    invoices = Invoice.objects.filter(period_start=period.start)
    return {
        "invoices": len(result.created),
        "lines": sum(invoice.lines.count() for invoice in invoices[:5]) // 5,
        "seconds": round(seconds, 2),
        "reconcile_seconds": round(reconcile_seconds, 2),
        "differences": len(report.differences),
    }


def main():
    args = parse_args()
    recreate_database(args.postgres, args.database)
    setup_django(args)
    from django.db import connection
    from django.utils import timezone

    from billing.periods import period_containing

    now = timezone.now()
    org_ids, versions = seed(args.organizations, now)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "postgresql": connection.cursor().execute("SHOW server_version").fetchone()[0],
        "organizations": args.organizations,
        "load_average_at_start": os.getloadavg(),
    }
    print(f"writing {args.events:,} gateway usage events", flush=True)
    write_events(args.events, org_ids, versions, now)
    print("ingesting", flush=True)
    results["ingest"] = bench_ingest(args.events)
    print(f"  {results['ingest']}", flush=True)

    if args.ledger_rows:  # --ledger-rows 0 measures ingestion alone
        previous = period_containing(period_containing(now).start - timedelta(seconds=1))
        print(f"writing {args.ledger_rows:,} ledger rows for {previous.label}", flush=True)
        write_ledger(args.ledger_rows, org_ids, versions, previous)
        print(f"closing {previous.label}", flush=True)
        results["close"] = {"ledger_rows": args.ledger_rows, **bench_close(previous)}
        print(f"  {results['close']}", flush=True)

    print()
    print(f"{'measure':<44} {'value':>14} {'goal':>12}")
    ingest = results["ingest"]
    print(f"{'ingest: events/s':<44} {ingest['events_per_second']:>14,} {'>= 20,000':>12}")
    print(f"{'ingest: events per CPU-second':<44} {ingest['events_per_cpu_second']:>14,}")
    if "close" in results:
        close = results["close"]
        print(
            f"{'close: seconds for ' + format(args.ledger_rows, ',') + ' rows':<44} "
            f"{close['seconds']:>14} {'< 60':>12}"
        )
        print(f"{'reconcile: seconds':<44} {close['reconcile_seconds']:>14}")
    out = REPO_ROOT / "bench" / "results" / "billing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
