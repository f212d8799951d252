"""GET /api/v1/models over a catalog of 10,000 models, with two filters.

    python bench/catalog.py [--models 10000] [--requests 200]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test python bench/catalog.py

Builds a throwaway database (a SQLite file in a temporary folder, or the database
`bench_sirocco_catalog` on the server DATABASE_URL names), fills it with --models public models,
each with one published version, a token price and a dedicated price, then sends --requests
requests through Django's full stack in this process (middleware, API-key authentication,
filters, pagination, serialization; no network) and reports p50/p95 latency (and p50 CPU time of
this process, which other load on a shared machine does not inflate) and the number of SQL
queries per request, also on a catalog of 100 models to show the count does not grow.
Writes bench/results/catalog.json.
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
from decimal import Decimal
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Two filters customers combine: a task (JSON list, via the facets text) and a hardware profile
# (a fit computed in SQL), plus the default ordering and page size.
QUERY = "/api/v1/models?task=chat&deployable_on=h100-80gb-x2"
PUBLISHERS = ["Mistral AI", "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne"]
TASK_SETS = [["chat", "completion"], ["completion"], ["chat", "function-calling"], ["embeddings"]]
LANGUAGES = [["en"], ["en", "fr", "de"], ["es", "it"], ["fr"]]


def setup_django(tmp: Path) -> None:
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    os.environ["SIROCCO_VAR_DIR"] = str(tmp)
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        os.environ["TEST_DATABASE_NAME"] = "bench_sirocco_catalog"
    else:
        os.environ.pop("DATABASE_URL", None)
        os.environ["TEST_DATABASE_NAME"] = str(tmp / "bench.sqlite3")
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlplane.settings.base"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def fill(count: int, start: int) -> None:
    """`count` models with a published vLLM version, a token price and a dedicated price."""
    from django.utils import timezone

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

    vllm = ServingRuntime.objects.get(name="vllm")
    profile = HardwareProfile.objects.get(name="h100-80gb-x2")
    models = []
    for i in range(start, start + count):
        moe = i % 3 == 0
        total = 7_000_000_000 + (i % 50) * 1_000_000_000
        model = Model(
            slug=f"bench-model-{i:05d}",
            display_name=f"Bench Model {i}",
            publisher=PUBLISHERS[i % len(PUBLISHERS)],
            family="Bench",
            description=f"# Bench model {i}\n\nA synthetic model for the catalog benchmark.",
            tasks=TASK_SETS[i % len(TASK_SETS)],
            languages=LANGUAGES[i % len(LANGUAGES)],
            license="Apache-2.0" if i % 2 else "MIT",
            context_length=[4096, 8192, 32768, 65536][i % 4],
            architecture="moe" if moe else "dense",
            num_experts=8 if moe else None,
            experts_per_token=2 if moe else None,
            total_parameters=total,
            active_parameters=total // 4 if moe else total,
            tags=["moe"] if moe else ["dense"],
        )
        model.refresh_search_fields()
        models.append(model)
    Model.objects.bulk_create(models, batch_size=1000)
    created = Model.objects.filter(slug__in=[m.slug for m in models])
    versions = []
    for model in created:
        version = ModelVersion(
            model=model,
            version="v1",
            status="published",
            serving_runtime=vllm,
            dtype="bfloat16",
            runtime_args={"max_model_len": 4096},
            served_model_name=model.slug,
        )
        requirements = version_requirements(version)
        version.required_memory_gb = requirements.required_gb
        version.min_gpu_memory_gb = requirements.min_gpu_memory_gb
        version.published_at = timezone.now()
        versions.append(version)
    ModelVersion.objects.bulk_create(versions, batch_size=1000)
    saved = ModelVersion.objects.filter(model__slug__in=[m.slug for m in models])
    refresh_listings([v.model_id for v in saved])  # what ModelVersion.save does one by one
    TokenPrice.objects.bulk_create(
        [
            TokenPrice(
                model_version=v,
                input_per_million=Decimal("0.500000"),
                output_per_million=Decimal("1.500000"),
                effective_from="2025-01-01T00:00:00Z",
            )
            for v in saved
        ],
        batch_size=1000,
    )
    DedicatedPrice.objects.bulk_create(
        [
            DedicatedPrice(
                model_version=v,
                hardware_profile=profile,
                per_hour=Decimal("7.0000"),
                effective_from="2025-01-01T00:00:00Z",
            )
            for v in saved
            if v.min_gpu_memory_gb <= profile.total_gpu_memory_gb
        ],
        batch_size=1000,
    )


def analyze(connection) -> None:
    """PostgreSQL's autovacuum analyzes a table soon after thousands of inserts; without its
    statistics the planner guesses one row per table and picks nested loops over 10,000 rows.
    The embedded SQLite default never runs ANALYZE, so neither does this benchmark there."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")


def measure(client, requests: int) -> dict:
    from django.db import connection

    for _ in range(5):  # warm caches
        assert client.get(QUERY).status_code == 200
    statements = []

    def count(execute, sql, params, many, context):
        statements.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        response = client.get(QUERY)
    assert response.status_code == 200, response.content
    body = response.json()
    timings, cpu_times = [], []
    for _ in range(requests):
        started, started_cpu = time.perf_counter(), time.process_time()
        response = client.get(QUERY)
        timings.append((time.perf_counter() - started) * 1000)
        cpu_times.append((time.process_time() - started_cpu) * 1000)
        assert response.status_code == 200
    timings.sort()
    return {
        "matching_models": body["count"],
        "page_items": len(body["results"]),
        "queries_per_request": len(statements),
        "p50_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 2),
        # CPU time of this process: Django and, for SQLite, the database engine too. Unlike
        # wall time it does not grow when other programs hold the CPUs.
        "p50_cpu_ms": round(statistics.median(cpu_times), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="sirocco-bench-catalog-") as folder:
        setup_django(Path(folder))
        from django.db import connection
        from rest_framework.test import APIClient

        creation = connection.creation
        creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
        try:
            from accounts.actors import Actor
            from accounts.models import APIKey, Organization
            from accounts.roles import Role
            from accounts.services import api_key_create
            from catalog.seeds import ensure_runtimes_and_profiles

            ensure_runtimes_and_profiles()
            organization = Organization.objects.create(slug="bench", name="Bench")
            _key, secret = api_key_create(
                actor=Actor.system(organization),
                name="bench",
                scopes=[APIKey.Scope.MANAGEMENT],
                role=Role.VIEWER,
            )
            client = APIClient(HTTP_HOST="localhost")
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")

            small_count = min(100, args.models)
            fill(small_count, 0)
            analyze(connection)
            small = measure(client, max(20, args.requests // 5))
            started = time.perf_counter()
            fill(args.models - small_count, small_count)
            fill_seconds = time.perf_counter() - started
            analyze(connection)
            large = measure(client, args.requests)
        finally:
            vendor = connection.vendor
            creation.destroy_test_db(creation.connection.settings_dict["NAME"], verbosity=0)

    result = {
        "query": QUERY,
        "database": vendor,
        "models": args.models,
        "requests": args.requests,
        "fill_seconds": round(fill_seconds, 1),
        f"at_{small_count}_models": small,
        f"at_{args.models}_models": large,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        # The development machine is shared: the load says how much else was running.
        "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))
    out = REPO_ROOT / "bench" / "results" / "catalog.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ok = large["p50_ms"] < 50 and large["queries_per_request"] == small["queries_per_request"]
    print(
        f"{vendor}: p50 {large['p50_ms']} ms at {args.models} models (target < 50 ms); "
        f"{large['queries_per_request']} queries per request at {args.models} models, "
        f"{small['queries_per_request']} at {small_count}: {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
