"""Reconcile 1,000 deployments against the emulated Kubernetes API with 2 worker processes;
then a local deploy of mixtral-tiny to ready.

    python bench/reconcile.py [--deployments 1000] [--workers 2] [--skip-local]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test python bench/reconcile.py

Part 1 (kubernetes): starts kmock's Kubernetes emulation with the simulated scheduler and
kubelet of the test suite (tests/deployments/kube.py) on loopback, in this process, with enough
GPU nodes; creates --deployments dedicated deployments (100 organizations) through the service,
as the REST API would (each enqueues its reconcile on a Redis broker, redis://127.0.0.1:6379
database 14); then starts one real Celery worker (`--concurrency` = --workers prefork
processes) with the kubernetes provisioner pointed at the emulated API, and waits until every
deployment is `ready`. Reports the time to converge from the worker's start (creating them is
reported apart), Kubernetes API calls per deployment (by verb), and a steady-state sweep: its
duration, its API calls, and the writes it made (database statements other than SELECT, and
Kubernetes writes) — zero is the goal.

Part 2 (local): the embedded default's path, in this process: create a dedicated deployment of
mixtral-tiny on cpu-small and run reconcile passes at the local provisioner's poll interval (what
the worker's requeue does) until it is `ready`; reports the seconds from create to ready, with
the runtime's own "ready in" line for comparison.

The database is a SQLite file in a temporary folder, or `bench_sirocco_deployments` on the
PostgreSQL server DATABASE_URL names (created and dropped). Writes bench/results/reconcile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BROKER = "redis://127.0.0.1:6379/14"
ORGANIZATIONS = 100
BENCH_DATABASE = "bench_sirocco_deployments"


def database_url(tmp: Path) -> str:
    server = os.environ.get("DATABASE_URL", "")
    if not server.startswith("postgres"):
        return f"sqlite:///{tmp / 'bench.sqlite3'}"
    import psycopg

    base = server.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE}")
        connection.execute(f"CREATE DATABASE {BENCH_DATABASE}")
    return f"{base}/{BENCH_DATABASE}"


def drop_database(url: str) -> None:
    if url.startswith("postgres"):
        import psycopg

        base = url.rsplit("/", 1)[0]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")


def setup_django(tmp: Path, db_url: str, kubeconfig: Path) -> dict:
    env = {
        "SECRET_KEY": "bench-only-secret-key-" + "x" * 30,
        "SIROCCO_VAR_DIR": str(tmp),
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": BROKER,
        "SIROCCO_PROVISIONER": "kubernetes",
        "SIROCCO_KUBECONFIG": str(kubeconfig),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "text",
        "PYTHONPATH": str(REPO_ROOT),
    }
    os.environ.update(env)
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return {**os.environ, **env}


def make_catalog():
    from decimal import Decimal

    from catalog.models import DedicatedPrice, HardwareProfile, ModelVersion
    from catalog.seeds import ensure_catalog_seeds

    ensure_catalog_seeds()
    version = ModelVersion.objects.get(model__slug="mistral-7b-instruct-v0.3")
    version.artifact_uri = "s3://sirocco-artifacts/models/mistral-7b-instruct-v0.3/v0.3"
    version.size_bytes = 14_500_000_000
    version.save()
    profile = HardwareProfile.objects.get(name="h100-80gb-x1")
    if not DedicatedPrice.objects.filter(model_version=version, hardware_profile=profile):
        DedicatedPrice.objects.create(
            model_version=version, hardware_profile=profile, per_hour=Decimal("3.5")
        )
    return version, profile


def start_worker(env: dict, concurrency: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "controlplane",
            "worker",
            "--queues",
            "provisioning",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def purge_broker() -> None:
    import redis

    redis.Redis.from_url(BROKER).flushdb()


def bench_kubernetes(args, tmp: Path) -> dict:
    from tests.deployments.kube import ClusterThread, SimulatedCluster, gpu_nodes

    nodes = gpu_nodes(count=(args.deployments + 7) // 8 + 2, gpus=8)
    for node in nodes:
        node.labels = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # Schema validation of every apply (on in the tests) would be the emulator's own cost.
    cluster_thread = ClusterThread(SimulatedCluster(nodes=nodes, validate_schemas=False))
    cluster_thread.__enter__()
    db_url = database_url(tmp)
    worker = None
    try:
        kubeconfig = cluster_thread.kubeconfig(tmp / "kubeconfig")
        env = setup_django(tmp, db_url, kubeconfig)
        from django.db import connection

        from accounts.actors import Actor
        from accounts.models import Organization
        from deployments.models import Deployment
        from deployments.reconciler import sweep
        from deployments.services import deployment_create

        version, profile = make_catalog()
        organizations = [
            Organization.objects.create(
                slug=f"bench-{index:03d}", name=f"Bench {index}", max_gpus=64, max_deployments=64
            )
            for index in range(ORGANIZATIONS)
        ]
        purge_broker()
        cluster = cluster_thread.cluster
        # The simulated control loop runs by itself, as a cluster's controllers would.
        cluster_thread.start_auto(interval=args.tick)

        # Every deployment is asked for first (the API's cost, reported apart; each create
        # enqueues its reconcile), then the worker starts and converges them all.
        started = time.monotonic()
        for index in range(args.deployments):
            deployment_create(
                actor=Actor.system(organizations[index % ORGANIZATIONS]),
                name=f"model-{index:04d}",
                model=version.model.slug,
                hardware_profile=profile.name,
            )
        created = time.monotonic() - started
        worker = start_worker(env, args.workers, tmp / "worker.log")
        started = time.monotonic()
        ready = 0
        progress = []
        while time.monotonic() - started < args.timeout:
            ready = Deployment.objects.filter(status=Deployment.Status.READY).count()
            progress.append((round(time.monotonic() - started, 1), ready))
            if ready == args.deployments:
                break
            time.sleep(0.5)
        converged = time.monotonic() - started
        statuses = Counter(Deployment.objects.values_list("status", flat=True))
        stop_worker(worker)
        worker = None
        calls = Counter(verb for verb, *_ in cluster.calls)

        # Steady state: a sweep reads the database and the cluster, and writes nothing.
        cluster_thread.stop_auto()
        cluster_thread.tick(2)
        before = len(cluster.calls)
        statements: list[str] = []

        def record(execute, sql, params, many, context):
            statements.append(sql)
            return execute(sql, params, many, context)

        sweep_started = time.monotonic()
        with connection.execute_wrapper(record):
            stalled, drifted = sweep()
        sweep_seconds = time.monotonic() - sweep_started
        sweep_calls = cluster.calls[before:]
        db_writes = [s for s in statements if not s.lstrip().upper().startswith("SELECT")]
        k8s_writes = [c for c in sweep_calls if c[0] in ("patch", "create", "delete", "update")]
        return {
            "deployments": args.deployments,
            "worker_processes": args.workers,
            "database": "postgresql" if db_url.startswith("postgres") else "sqlite",
            "create_seconds": round(created, 1),
            "converge_seconds_from_worker_start": round(converged, 1),
            "all_ready": ready == args.deployments,
            "statuses": dict(statuses),
            "api_calls": sum(calls.values()),
            "api_calls_per_deployment": round(sum(calls.values()) / args.deployments, 2),
            "api_calls_per_deployment_by_verb": {
                verb: round(count / args.deployments, 2) for verb, count in sorted(calls.items())
            },
            "progress": progress[:: max(1, len(progress) // 20)],
            "sweep_seconds": round(sweep_seconds, 2),
            "sweep_api_calls": len(sweep_calls),
            "sweep_kubernetes_writes": len(k8s_writes),
            "sweep_database_writes": len(db_writes),
            "sweep_reconciles_enqueued": len(stalled) + len(drifted),
        }
    finally:
        if worker is not None:
            stop_worker(worker)
        cluster_thread.__exit__(None, None, None)
        from django.db import connections

        connections.close_all()
        drop_database(db_url)


def bench_local(tmp: Path) -> dict:
    """mixtral-tiny on cpu-small through the local provisioner, from create to ready."""
    from django.conf import settings

    from accounts.actors import Actor
    from accounts.models import Organization
    from catalog.tiny import ensure_tiny_moe
    from deployments.models import Deployment
    from deployments.provisioners.local import stop_all
    from deployments.reconciler import reconcile
    from deployments.services import deployment_create

    ensure_tiny_moe()
    organization = Organization.objects.create(slug="bench-local", name="Bench local")
    started = time.monotonic()
    deployment = deployment_create(
        actor=Actor.system(organization),
        name="tiny",
        model="mixtral-tiny",
        hardware_profile="cpu-small",
    )
    passes = 0
    try:
        while time.monotonic() - started < 120:
            passes += 1
            requeue = reconcile(deployment.pk)
            if requeue is None:
                break
            time.sleep(requeue)
        seconds = time.monotonic() - started
        deployment.refresh_from_db()
        logs = list((settings.VAR_DIR / "replicas").glob("*/*.log"))
        runtime_ready = None
        for log in logs:
            found = re.search(r"ready in ([0-9.]+)s", log.read_text())
            runtime_ready = float(found.group(1)) if found else runtime_ready
        return {
            "status": deployment.status,
            "seconds_to_ready": round(seconds, 1),
            "reconcile_passes": passes,
            "runtime_reported_ready_in_seconds": runtime_ready,
        }
    finally:
        Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.DELETING)
        reconcile(deployment.pk)
        stop_all(settings.VAR_DIR / "replicas")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tick", type=float, default=0.2, help="simulated control loop period")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sirocco-bench-reconcile-") as folder:
        tmp = Path(folder)
        if args.local_only:
            setup_local_django(tmp)
            print(json.dumps(bench_local(tmp)))
            return
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at start",
            "kubernetes": bench_kubernetes(args, tmp),
        }
    if not args.skip_local:
        # In a fresh process: its own SQLite database and the local provisioner.
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        output = subprocess.run(
            [sys.executable, __file__, "--local-only"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result["local"] = json.loads(output.strip().splitlines()[-1])
    out = REPO_ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconcile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def setup_local_django(tmp: Path) -> None:
    os.environ.update(
        {
            "SECRET_KEY": "bench-only-secret-key-" + "x" * 30,
            "SIROCCO_VAR_DIR": str(tmp),
            "SIROCCO_PROVISIONER": "local",
            "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            "ARTIFACT_STORE_URL": "",
        }
    )
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(name, None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


if __name__ == "__main__":
    main()
