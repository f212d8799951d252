"""What making usage durable costs, by path: the gateway's usage writer (gateway/usage.py)
committing to the database (the fast path), appending to the local spool while the database
refuses (gateway/spool.py), and shipping the spool back once it answers; plus the raw cost of
one append + fdatasync on this disk, which decides which path is the default.

    python bench/usage_durability.py [--events 3000] [--concurrency 64] [--compare-with DIR]

For each database (PostgreSQL at 127.0.0.1:5432 in a fresh database, and a SQLite file as the
embedded default) a child process migrates it, sets Django up and drives the writer on its
event loop: "serial" submits one event and waits for it before the next (a request's added
latency), "concurrent" keeps `--concurrency` submitters busy (group commit's throughput).
`--compare-with` runs the fast-path measurements with another checkout's writer too (e.g. a
worktree of the previous commit), in the same run, for a side-by-side figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgres://postgres@127.0.0.1:5432"
DATABASE = "bench_sirocco_usage"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def event() -> dict:
    now = datetime.now(UTC)
    return {
        "request_id": "req_" + uuid.uuid4().hex,
        "organization_id": 1,
        "api_key_id": 1,
        "deployment_id": uuid.uuid4(),
        "model_version_id": 1,
        "deployment_type": "serverless",
        "model": "bench",
        "prompt_tokens": 12,
        "completion_tokens": 8,
        "cached_tokens": 0,
        "status_code": 200,
        "latency_ms": 1.5,
        "ttft_ms": None,
        "usage_source": "upstream",
        "started_at": now,
        "finished_at": now,
    }


# ---- the child: one database, one checkout -------------------------------------------------


async def serial(writer, count: int) -> dict:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await writer.submit(event())
        latencies.append(time.perf_counter() - started)
    return {
        "p50_us": round(percentile(latencies, 0.5) * 1e6),
        "p99_us": round(percentile(latencies, 0.99) * 1e6),
    }


async def concurrent(writer, count: int, concurrency: int) -> dict:
    async def submitter(n):
        for _ in range(n):
            await writer.submit(event())

    started = time.perf_counter()
    await asyncio.gather(*(submitter(count // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"events_per_s": round(count // concurrency * concurrency / elapsed)}


def rename_table(away: bool) -> None:
    from django.db import connection

    table = "gateway_usageevent"
    old, new = (table, f"{table}_away") if away else (f"{table}_away", table)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {old} RENAME TO {new}")
    connection.close()


def stored() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM gateway_usageevent")
        (count,) = cursor.fetchone()
    connection.close()
    return count


async def measure(args) -> dict:
    import inspect

    from gateway.usage import UsageWriter

    spool_dir = Path(tempfile.mkdtemp(prefix="bench-usage-spool-"))
    has_spool = "spool_dir" in inspect.signature(UsageWriter).parameters
    writer = UsageWriter(spool_dir=spool_dir) if has_spool else UsageWriter()
    result = {}
    if has_spool and not args.fast_path_only:
        # The disk is shared and busy to different degrees: measured before and after.
        result["fdatasync before"] = raw_fdatasync(spool_dir, args.events)
    try:
        await serial(writer, 50)  # connect, warm up
        result["database serial"] = await serial(writer, args.events)
        result["database concurrent"] = await concurrent(writer, args.events * 4, args.concurrency)
        if has_spool and not args.fast_path_only:
            before = await asyncio.to_thread(stored)
            await asyncio.to_thread(rename_table, True)  # the database refuses the insert
            await serial(writer, 5)  # the first batch finds out; the rest go to the spool
            result["spool serial"] = await serial(writer, args.events)
            result["spool concurrent"] = await concurrent(writer, args.events * 4, args.concurrency)
            spooled = args.events + args.events * 4 // args.concurrency * args.concurrency + 5
            await asyncio.to_thread(rename_table, False)
            started = time.perf_counter()
            while await asyncio.to_thread(stored) < before + spooled:
                await asyncio.sleep(0.01)
            result["shipping"] = {"events_per_s": round(spooled / (time.perf_counter() - started))}
    finally:
        await writer.close()
    if has_spool and not args.fast_path_only:
        result["fdatasync after"] = raw_fdatasync(spool_dir, args.events)
    return result


def raw_fdatasync(directory: Path, count: int) -> dict:
    path = directory / "raw"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 420)  # about one framed event
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return {
        "p50_us": round(percentile(latencies, 0.5) * 1e6),
        "p99_us": round(percentile(latencies, 0.99) * 1e6),
    }


def child(args) -> None:
    import django

    django.setup()
    print(json.dumps(asyncio.run(measure(args))))


# ---- the parent -------------------------------------------------------------------------------


def fresh_database(kind: str, checkout: Path, workdir: Path) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}},
        "SECRET_KEY": "bench-usage-durability-" + "x" * 30,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "SIROCCO_VAR_DIR": str(workdir / "var"),
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(checkout),
    }
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
            admin.execute(f"CREATE DATABASE {DATABASE}")
        env["DATABASE_URL"] = f"{POSTGRES}/{DATABASE}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=checkout,
        env=env,
        check=True,
        timeout=600,
    )
    return env


def run_child(kind: str, checkout: Path, args, *, fast_path_only: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as workdir:
        env = fresh_database(kind, checkout, Path(workdir))
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child",
            "--events", str(args.events), "--concurrency", str(args.concurrency),
        ]  # fmt: skip
        if fast_path_only:
            command.append("--fast-path-only")
        done = subprocess.run(
            command, cwd=checkout, env=env, timeout=900, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"the {kind} run in {checkout} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--compare-with", type=Path, help="another checkout's writer, side by side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fast-path-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()}")
    for kind in ("postgresql", "sqlite"):
        results = {"this checkout": run_child(kind, ROOT, args, fast_path_only=False)}
        if args.compare_with:
            results[str(args.compare_with)] = run_child(
                kind, args.compare_with.resolve(), args, fast_path_only=True
            )
        for checkout, result in results.items():
            for name, figures in result.items():
                print(f"{kind:10} {checkout:28} {name:20} {figures}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
