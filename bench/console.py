"""Server time of the console's pages with a big catalog and many deployments.

    .venv/bin/python bench/console.py [--models 10000] [--deployments 1000] [--rounds 30]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_console .venv/bin/python bench/console.py

Seeds a fresh database (a SQLite file under a temporary folder unless DATABASE_URL is set;
an existing PostgreSQL database of that name is dropped and made again) with `--models` public
models (one published, priced version each), 6 hardware profiles, and one organization with
`--deployments` deployments (a replica each), 30 days of usage rollups and an invoice. Then it
requests each page `--rounds` times in-process through Django's test client, logged in as the
organization's owner (after ANALYZE: see below), and reports per page the p50 and p95 of the time from request to
response (middleware, view, queries, template), the p50 of this thread's CPU time over the same
requests (steadier than wall time on a shared machine), and the number of SQL queries. Prints a table
and writes bench/results/console.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def configure(var_dir: Path) -> None:
    os.environ.setdefault("SECRET_KEY", "bench-console-" + "x" * 40)
    os.environ["SIROCCO_VAR_DIR"] = str(var_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlplane.settings.base"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "false")
    import django

    django.setup()


def fresh_database() -> None:
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor == "postgresql":
        name = connection.settings_dict["NAME"]
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cursor.execute(f'CREATE DATABASE "{name}"')
    call_command("migrate", verbosity=0, interactive=False)


def seed(*, models: int, deployments: int):
    from django.utils import timezone

    from accounts.models import Membership, Organization, User
    from accounts.roles import Role
    from billing.invoicing import billing_period_close
    from billing.ledger import usage_events_ingest
    from billing.periods import period_containing
    from catalog.fit import version_requirements
    from catalog.models import (
        DedicatedPrice,
        HardwareProfile,
        Model,
        ModelVersion,
        ServingRuntime,
        TokenPrice,
        refresh_listings,
    )
    from deployments.models import Deployment, DeploymentEvent, Replica
    from metering.models import UsageEvent

    now = timezone.now()
    vllm = ServingRuntime.objects.create(
        name="vllm", display_name="vLLM", image="vllm/vllm-openai:v0.11.0", device="gpu"
    )
    profiles = [
        HardwareProfile.objects.create(
            name=f"gpu-{count}x{memory}",
            display_name=f"{count} × {memory} GB",
            gpu_model="NVIDIA H100 80GB",
            gpu_count=count,
            gpu_memory_gb=memory,
            cpu_request="16",
            memory_request="128Gi",
            price_per_hour=Decimal(count * 4),
        )
        for count in (1, 2, 4)
        for memory in (24, 80)
    ]
    tasks = [["chat", "completion"], ["chat"], ["completion"], ["embeddings"]]
    languages = [["en"], ["en", "fr", "de", "es", "it"], ["zh", "en"], ["ja"]]
    licenses = ["Apache-2.0", "MIT", "Llama-3", "CC-BY-4.0"]
    batch = []
    for n in range(models):
        model = Model(
            slug=f"model-{n:05d}" if n else "mixtral-8x7b-instruct",
            display_name=f"Model {n:05d}" if n else "Mixtral 8x7B Instruct",
            publisher=["Mistral AI", "Meta", "Alibaba", "Google"][n % 4],
            family="family",
            description="# Card\n\nA model for benchmarks.\n\n" + "Words about it. " * 40,
            tasks=tasks[n % 4],
            languages=languages[n % 4],
            license=licenses[n % 4],
            context_length=[8192, 32768, 131072][n % 3],
            architecture="moe" if n % 5 == 0 else "dense",
            num_experts=8 if n % 5 == 0 else None,
            experts_per_token=2 if n % 5 == 0 else None,
            total_parameters=[7, 13, 47, 70, 110][n % 5] * 10**9,
            active_parameters=[7, 13, 13, 70, 110][n % 5] * 10**9,
            tags=["moe"] if n % 5 == 0 else [],
        )
        model.refresh_search_fields()
        batch.append(model)
    Model.objects.bulk_create(batch, batch_size=2000)
    all_models = list(Model.objects.order_by("pk"))
    versions = []
    for model in all_models:
        version = ModelVersion(
            model=model,
            version="v1",
            status="published",
            serving_runtime=vllm,
            runtime_args={"max_model_len": 32768, "gpu_memory_utilization": 0.9},
            served_model_name=model.slug,
            published_at=now,
        )
        requirements = version_requirements(version)
        version.required_memory_gb = requirements.required_gb
        version.min_gpu_memory_gb = requirements.min_gpu_memory_gb
        versions.append(version)
    ModelVersion.objects.bulk_create(versions, batch_size=2000)
    refresh_listings([model.pk for model in all_models])  # what ModelVersion.save would do
    versions = list(ModelVersion.objects.order_by("pk"))
    TokenPrice.objects.bulk_create(
        [
            TokenPrice(
                model_version=v,
                input_per_million=Decimal("0.70"),
                output_per_million=Decimal("0.70"),
                effective_from=now - timedelta(days=90),
            )
            for v in versions
        ],
        batch_size=2000,
    )
    mixtral = versions[0]
    DedicatedPrice.objects.bulk_create(
        [
            DedicatedPrice(
                model_version=mixtral,
                hardware_profile=profile,
                per_hour=profile.price_per_hour,
                effective_from=now - timedelta(days=90),
            )
            for profile in profiles
        ]
    )

    owner = User.objects.create_user("owner@bench.example", "bench-password-123")
    organization = Organization.objects.create(
        slug="bench", name="Bench Org", max_deployments=deployments + 10
    )
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    big = next(p for p in profiles if p.gpu_count == 2 and p.gpu_memory_gb == 80)
    rows = [
        Deployment(
            organization=organization,
            name=f"deployment-{n:04d}",
            model_version=versions[n % len(versions)],
            type="dedicated",
            hardware_profile=big,
            serving_runtime=vllm,
            status=["ready", "provisioning", "failed", "scaling"][n % 4],
            progress_phase="ready",
            progress_percent=100,
            ready_replicas=1,
            created_at=now - timedelta(minutes=n),
        )
        for n in range(deployments)
    ]
    Deployment.objects.bulk_create(rows, batch_size=1000)
    Replica.objects.bulk_create(
        [
            Replica(deployment=d, name=f"{d.name}-0", endpoint="http://127.0.0.1:1", ready=True)
            for d in rows
        ],
        batch_size=1000,
    )
    DeploymentEvent.objects.bulk_create(
        [
            DeploymentEvent(deployment=rows[0], reason="Progress", message=f"step {n}")
            for n in range(200)
        ]
    )
    # 30 days of traffic to 20 deployments, plus last period's, which is then invoiced.
    last_period = period_containing(period_containing(now).start - timedelta(days=1))
    events = []
    for day in range(30):
        for d in rows[:20]:
            events.append(
                UsageEvent(
                    request_id=f"bench-{uuid.uuid4().hex}",
                    organization=organization,
                    deployment_id=d.pk,
                    model_version_id=d.model_version_id,
                    deployment_type="dedicated",
                    model=d.name,
                    prompt_tokens=1000,
                    completion_tokens=300,
                    status_code=200,
                    latency_ms=100.0,
                    usage_source="upstream",
                    started_at=now - timedelta(days=day, seconds=2),
                    finished_at=now - timedelta(days=day, seconds=1),
                )
            )
    for d in rows[:20]:
        events.append(
            UsageEvent(
                request_id=f"bench-{uuid.uuid4().hex}",
                organization=organization,
                deployment_id=d.pk,
                model_version_id=d.model_version_id,
                deployment_type="dedicated",
                model=d.name,
                prompt_tokens=500,
                completion_tokens=100,
                status_code=200,
                latency_ms=100.0,
                usage_source="upstream",
                started_at=last_period.start + timedelta(hours=1),
                finished_at=last_period.start + timedelta(hours=1, seconds=1),
            )
        )
    UsageEvent.objects.bulk_create(events, batch_size=1000)
    while usage_events_ingest(now=now):
        pass
    billing_period_close(period_start=last_period.start, now=now)
    invoice = organization.invoices.order_by("-period_start").first()
    return {
        "owner": owner,
        "model": all_models[0],
        "deployment": rows[0],
        "invoice": invoice,
    }


def pages(data) -> dict[str, str]:
    slug = data["model"].slug
    return {
        "overview": "/",
        "models": "/models/",
        "models search": "/models/?q=mixtral",
        "models filtered": "/models/?language=fr&size=medium&task=chat",
        "model": f"/models/{slug}/",
        "deploy form": f"/models/{slug}/deploy",
        "deployments": "/deployments/",
        "deployment": f"/deployments/{data['deployment'].pk}/",
        "deployment live (htmx)": f"/deployments/{data['deployment'].pk}/?live=1",
        "usage": "/usage/",
        "invoices": "/invoices/",
        "invoice": f"/invoices/{data['invoice'].number}/",
        "api keys": "/api-keys/",
        "settings": "/settings/",
    }


def measure(client, path: str, rounds: int, htmx: bool) -> dict:
    from django.db import connection

    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    client.get(path, **headers)  # warm: template compilation, first-use caches
    queries = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        response = client.get(path, **headers)
    if response.status_code != 200:
        raise SystemExit(f"{path} answered {response.status_code}")
    times, cpu = [], []
    for _ in range(rounds):
        started, started_cpu = time.perf_counter(), time.thread_time()
        client.get(path, **headers)
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - started_cpu) * 1000)
    times.sort()
    return {
        "path": path,
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[int(len(times) * 0.95) - 1], 1),
        # This thread's CPU time: what the page costs the web process whatever else runs on
        # the machine (with SQLite that includes the queries; PostgreSQL's work is elsewhere).
        "cpu_p50_ms": round(statistics.median(cpu), 1),
        "queries": len(queries),
        "bytes": len(response.content),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--deployments", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-console-") as var_dir:
        configure(Path(var_dir))
        from django.db import connection
        from django.test import Client

        fresh_database()
        started = time.perf_counter()
        data = seed(models=args.models, deployments=args.deployments)
        # Planner statistics, as a live database has them (PostgreSQL's autovacuum analyzes by
        # itself; SQLite only when told). Without them SQLite sorts all 10,000 models to show
        # the first 24 instead of reading them off the slug index.
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        seeded_s = time.perf_counter() - started
        load_before = f"{os.getloadavg()[0]:.2f}"
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(data["owner"])
        results = {
            name: measure(client, path, args.rounds, htmx=name.endswith("(htmx)"))
            for name, path in pages(data).items()
        }
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
            "python": platform.python_version(),
            "database": connection.vendor,
            "models": args.models,
            "deployments": args.deployments,
            "rounds": args.rounds,
            "seed_seconds": round(seeded_s, 1),
            "load_average_before": load_before,
            "pages": results,
        }
    print(
        f"{args.models} models, {args.deployments} deployments, {report['database']}, "
        f"{args.rounds} rounds (seeded in {report['seed_seconds']} s)"
    )
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.2f}")
    print(f"{'page':<24} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8} {'queries':>8}  path")
    for name, row in results.items():
        print(
            f"{name:<24} {row['p50_ms']:>8} {row['p95_ms']:>8} {row['cpu_p50_ms']:>8} "
            f"{row['queries']:>8}  {row['path']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "console.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
