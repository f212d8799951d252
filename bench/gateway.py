"""What the gateway costs: the same instant upstream called (a) directly, (b) through Sirocco's
gateway with auth, rate limits and usage on (PostgreSQL + Redis), (c) through LiteLLM's proxy.

    python bench/gateway.py [--duration 10] [--rate 200] [--workers 2] [--litellm-venv DIR]
    python bench/gateway.py --noisy-neighbour [--duration 10] [--rate 50] [--rounds 3]
    python bench/gateway.py --partner [--duration 10] [--rate 50]

`--partner` runs the partner-model rows: a partner-hosted model (catalog.providers) through the
gateway (PostgreSQL + Redis) to the fake Mistral API process of the tests
(tests/fakeprovider.py), against the same fake called directly with the same body; and, for
comparison on the same machine at the same time, the self-hosted rows (direct to the stub, and
through the gateway).

Reports, for non-streaming and streaming requests: saturation requests/s (wrk, closed loop,
64 connections), latency p50/p99 at a fixed rate (an open-loop asyncio client: one request
every 1/rate s whatever the answers do) and the latency added against the direct run, and
time to first token when streaming. Also how fast httpx and aiohttp call the stub from one
process (why the gateway uses aiohttp).

`--noisy-neighbour` runs only this: one gateway process (PostgreSQL + Redis); tenant B streams
at a steady `--rate` (open loop) alone, then while tenant A sends 4 concurrent 4 MB chat
bodies in a loop (two with one huge message, two with 85,000 small ones) to a model whose
tokenizer and chat template the gateway loads (the tiny MoE's), each tenant with its own stub
replica. Reports B's latency p50/p99 both ways, the longest pause inside B's streams (the stub
sends a whole answer at once, so any pause is the gateway's), and what A got done. Everything runs on this machine over loopback; the
upstream is bench/upstream_stub.py, which answers at once.

Needs: PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379 (as for the test suite), `wrk`
(Debian package), and for (c) LiteLLM in its own virtual environment, never in Sirocco's (its
pins would fight ours):

    python3.11 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install 'litellm[proxy]' prisma

LiteLLM tracks spend in PostgreSQL through Prisma, which must generate its client and fetch
its query engine at start; when that cannot work (no network), LiteLLM runs without a database
and the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgres://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/14"
SIROCCO_DB = "bench_sirocco_gateway"
LITELLM_DB = "bench_litellm_gateway"
MODEL = "bench"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 16}
HUGE_LIMIT = 2_000_000_000  # limits are checked on every request, never reached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({process.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def start(command: list[str], env: dict | None = None, log: Path | None = None):
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def recreate_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')


# ---- load ----------------------------------------------------------------------------------


def wrk(url: str, body: dict, key: str, duration: float, connections: int = 64) -> dict:
    """Closed-loop saturation with wrk: requests/s and how many answers were not 2xx."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    result = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration:.0f}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", result.stdout)
    socket_errors = re.search(r"Socket errors: (.*)", result.stdout)
    return {
        "requests_per_second": round(rps),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


async def fixed_rate(url: str, body: dict, key: str, rate: float, duration: float) -> dict:
    """Open loop: one request every 1/rate s. Latency to the last byte; TTFT when streaming."""
    stream = bool(body.get("stream"))
    latencies: list[float] = []
    ttfts: list[float] = []
    failures = 0
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    payload = json.dumps(body).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one():
            nonlocal failures
            started = time.perf_counter()
            first = None
            async with session.post(url, data=payload, headers=headers) as response:
                if stream:
                    async for line in response.content:
                        if first is None and (b'"content"' in line or b'"text"' in line):
                            first = time.perf_counter()
                else:
                    await response.read()
                if response.status != 200:
                    failures += 1
                    return
            latencies.append(time.perf_counter() - started)
            if first is not None:
                ttfts.append(first - started)

        count = int(rate * duration)
        begin = time.perf_counter()
        tasks = []
        for index in range(count):
            delay = begin + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    result = {"requests": count, "failures": failures, **percentiles("latency", latencies)}
    if stream:
        result.update(percentiles("ttft", ttfts))
    return result


def percentiles(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        f"{name}_p50_ms": round(statistics.median(ordered) * 1000, 3),
        f"{name}_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


def measure(name: str, base: str, key: str, args) -> dict:
    results = {}
    for mode, body in (("non_streaming", CHAT), ("streaming", {**CHAT, "stream": True})):
        url = base + "/chat/completions"
        wrk(url, body, key, 2)  # warm-up: connections, caches
        saturation = wrk(url, body, key, args.duration)
        latency = asyncio.run(fixed_rate(url, body, key, args.rate, args.duration))
        results[mode] = {"saturation": saturation, f"at_{args.rate:.0f}_rps": latency}
        print(f"  {name} {mode}: {saturation} | {latency}", flush=True)
    return results


async def client_comparison(stub: str, requests: int = 3000, concurrency: int = 16) -> dict:
    """Requests/s of one process calling the stub with each HTTP client (same concurrency)."""
    url = stub + "/v1/chat/completions"
    payload = json.dumps(CHAT).encode()
    headers = {"content-type": "application/json"}

    async def run(call):
        queue = list(range(requests))

        async def worker():
            while queue:
                queue.pop()
                await call()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return round(requests / (time.perf_counter() - started))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def with_httpx():
            (await client.post(url, content=payload, headers=headers)).read()

        httpx_rps = await run(with_httpx)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def with_aiohttp():
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()

        aiohttp_rps = await run(with_aiohttp)
    return {"httpx_rps": httpx_rps, "aiohttp_rps": aiohttp_rps}


# ---- the three targets ----------------------------------------------------------------------


SEED = """
from accounts.actors import Actor
from accounts.models import APIKey, Organization
from accounts.services import api_key_create
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
organization = Organization.objects.create(slug="bench", name="Bench")
deployment = DeploymentFactory(
    organization=organization, name={model!r}, model_version__served_model_name="stub",
    model_version__runtime_args={{"max_model_len": 32768}},
)
ReplicaFactory(deployment=deployment, endpoint={stub!r})
_key, secret = api_key_create(
    actor=Actor.system(organization), name="bench", scopes=[APIKey.Scope.INFERENCE],
    rpm_limit={limit}, tpm_limit={limit},
)
print(secret)
"""

# A partner model connected to the fake provider at {base} (no provider-wide quota: the
# rows measure the path, not a limit), enabled for the bench organization as {model}.
PARTNER_SEED = """
from accounts.actors import Actor
from accounts.models import APIKey, Organization
from accounts.services import api_key_create
from tests.partner import enable_partner_model, make_partner_model
version, _connection = make_partner_model({base!r})
organization = Organization.objects.create(slug="bench", name="Bench")
enable_partner_model(organization, version, name={model!r})
_key, secret = api_key_create(
    actor=Actor.system(organization), name="bench", scopes=[APIKey.Scope.INFERENCE],
    rpm_limit={limit}, tpm_limit={limit},
)
print(secret)
"""


def sirocco(
    stub: str,
    args,
    workdir: Path,
    *,
    embedded: bool = False,
    synchronous_commit: bool = True,
    seed: str | None = None,
    name: str | None = None,
    extra_env: dict | None = None,
) -> dict:
    """Production shape (PostgreSQL, Redis, several workers; usage flushed to disk before each
    response ends, or with synchronous_commit off), or the embedded default (SQLite file,
    in-process limits, hence one process)."""
    if embedded:
        database = {"DATABASE_URL": f"sqlite:///{workdir / 'sirocco.sqlite3'}"}
        workers = 1
    else:
        recreate_database(SIROCCO_DB)
        database = {
            "DATABASE_URL": f"{POSTGRES}/{SIROCCO_DB}",
            "REDIS_URL": REDIS_URL,
            "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
            "GATEWAY_USAGE_SYNCHRONOUS_COMMIT": str(synchronous_commit).lower(),
        }
        workers = args.workers
    env = {
        **database,
        "GATEWAY_ORG_RPM_LIMIT": str(HUGE_LIMIT),
        "GATEWAY_ORG_TPM_LIMIT": str(HUGE_LIMIT),
        "SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "CELERY_BROKER_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        **(extra_env or {}),
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env={**os.environ, **env}, check=True)
    seed = seed or SEED.format(model=MODEL, stub=stub, limit=HUGE_LIMIT)
    secret = subprocess.run(
        [*manage, "shell", "-c", seed],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    port = free_port()
    server = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "gateway.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
        workdir / f"sirocco-{'embedded' if embedded else synchronous_commit}.log",
    )
    if name is None:
        name = "sirocco_embedded" if embedded else "sirocco"
        if not synchronous_commit:
            name = "sirocco_async_commit"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process=server)
        results = measure(name, f"http://127.0.0.1:{port}/v1", secret, args)
        results["workers"] = workers
        results["usage_events"] = (
            count_sqlite_rows(workdir / "sirocco.sqlite3")
            if embedded
            else count_rows(SIROCCO_DB, "gateway_usageevent")
        )
        return results
    finally:
        stop(server)


def count_rows(database: str, table: str) -> int:
    import psycopg

    with psycopg.connect(f"{POSTGRES}/{database}") as connection:
        return connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def django_overhead(args, workdir: Path) -> dict:
    """What Django's ASGI handler and middleware stack cost per request: the same trivial JSON
    answer (`/healthz`) from Django (controlplane.asgi) and from the gateway's own ASGI app,
    each in one uvicorn process, saturated by wrk."""
    env = {
        "DATABASE_URL": f"sqlite:///{workdir / 'overhead.sqlite3'}",
        "SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
    }
    results = {}
    for name, app in (
        ("django", "controlplane.asgi:application"),
        ("gateway_app", "gateway.asgi:application"),
    ):
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", app, "--port", str(port)]
        server = start([*command, "--no-access-log", "--log-level", "warning"], env)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", process=server)
            result = subprocess.run(
                ["wrk", "-t1", "-c8", f"-d{args.duration:.0f}s", "--latency",
                 f"http://127.0.0.1:{port}/healthz"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", result)
            scale = {"us": 0.001, "ms": 1, "s": 1000}[p50.group(2)]
            results[name] = {
                "requests_per_second": round(
                    float(re.search(r"Requests/sec:\s+([\d.]+)", result).group(1))
                ),
                "latency_p50_ms": round(float(p50.group(1)) * scale, 3),
            }
        finally:
            stop(server)
    print("django vs the gateway's ASGI app (/healthz):", results, flush=True)
    return results


def count_sqlite_rows(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT count(*) FROM gateway_usageevent").fetchone()[0]


def litellm(stub: str, args, workdir: Path) -> dict:
    venv = Path(args.litellm_venv)
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        return {"skipped": f"no LiteLLM at {binary} (see this script's docstring)"}
    master = "sk-bench-master-" + uuid.uuid4().hex[:8]
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        "      model: openai/stub\n"
        f"      api_base: {stub}/v1\n"
        "      api_key: sk-stub\n"
        "general_settings:\n"
        f"  master_key: {master}\n"
    )
    recreate_database(LITELLM_DB)
    with_db = {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{LITELLM_DB}"}
    port = free_port()
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    # Its workers import for about a minute on this machine; uvicorn's default health check
    # would kill them before they answer.
    command += ["--num_workers", "2", "--timeout_worker_healthcheck", "300"]
    environment = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # offline: no fetch of the price map
    }
    database = "PostgreSQL (spend tracking on)"
    server = start(command, {**environment, **with_db}, workdir / "litellm-db.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300, process=server)
        key = virtual_key(port, master)
    except SystemExit as failure:
        stop(server)
        reason = (workdir / "litellm-db.log").read_text(errors="replace")[-600:]
        print(f"  LiteLLM with PostgreSQL failed ({failure}); running it without a database:")
        print("   ", reason.replace("\n", "\n    "))
        database = "none (Prisma could not start offline: see litellm_db_error)"
        server = start(command, environment, workdir / "litellm.log")
        try:
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300, process=server)
        except SystemExit:
            stop(server)
            raise
        key = master
    try:
        results = measure("litellm", f"http://127.0.0.1:{port}/v1", key, args)
        results["database"] = database
        if database.startswith("none"):
            results["litellm_db_error"] = reason
        else:
            time.sleep(5)  # LiteLLM writes spend logs in batches
            results["spend_logs"] = count_rows(LITELLM_DB, "LiteLLM_SpendLogs")
        return results
    finally:
        stop(server)


def virtual_key(port: int, master: str) -> str:
    """A LiteLLM virtual key with rpm/tpm limits, like Sirocco's (needs the database)."""
    response = httpx.post(
        f"http://127.0.0.1:{port}/key/generate",
        json={"rpm_limit": HUGE_LIMIT, "tpm_limit": HUGE_LIMIT},
        headers={"authorization": f"Bearer {master}"},
        timeout=60,
    )
    if response.status_code != 200:
        raise SystemExit(f"/key/generate answered {response.status_code}: {response.text[:300]}")
    return response.json()["key"]


NOISY_SEED = """
from accounts.actors import Actor
from accounts.models import APIKey, Organization
from accounts.services import api_key_create
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
for slug, stub, artifacts in (("tenant-a", {stub_a!r}, {artifacts!r}), ("tenant-b", {stub_b!r}, "")):
    organization = Organization.objects.create(slug=slug, name=slug)
    deployment = DeploymentFactory(
        organization=organization, name={model!r}, model_version__served_model_name="stub",
        model_version__runtime_args={{"max_model_len": 4_000_000}},
        model_version__artifact_uri=artifacts,
    )
    ReplicaFactory(deployment=deployment, endpoint=stub)
    _key, secret = api_key_create(
        actor=Actor.system(organization), name="bench", scopes=[APIKey.Scope.INFERENCE],
        rpm_limit={limit}, tpm_limit={limit},
    )
    print(secret)
"""
NOISY_HUGE = json.dumps(
    {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi " * 1_300_000}]}
).encode()
NOISY_MANY = json.dumps(
    {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}] * 85_000}
).encode()


async def tenant_b_streams(url: str, key: str, rate: float, duration: float) -> dict:
    """Open loop of streaming requests: latency to the last byte, and the longest pause
    between two reads of one stream."""
    latencies: list[float] = []
    pauses: list[float] = []
    failures = 0
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    payload = json.dumps({**CHAT, "stream": True}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one():
            nonlocal failures
            started = last = time.perf_counter()
            longest = 0.0
            async with session.post(url, data=payload, headers=headers) as response:
                async for _data in response.content.iter_any():
                    now = time.perf_counter()
                    if last is not started:
                        longest = max(longest, now - last)
                    last = now
                if response.status != 200:
                    failures += 1
                    return
            latencies.append(time.perf_counter() - started)
            pauses.append(longest)

        begin = time.perf_counter()
        tasks = []
        for index in range(int(rate * duration)):
            delay = begin + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {
        "requests": len(tasks),
        "failures": failures,
        **percentiles("latency", latencies),
        "longest_stream_pause_ms": round(max(pauses, default=0) * 1000, 3),
    }


def tenant_a_flood(url: str, key: str, seconds: float, results) -> None:
    """Tenant A's 4 concurrent 4 MB bodies in a loop for `seconds`, from a process of its own
    (A's clients are not on the gateway's machine: niced, so that sharing this machine's cores
    with the gateway weighs on it as little as it can)."""
    os.nice(10)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    statuses: dict[int, int] = {}

    async def run():
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
        ) as session:

            async def loop(body: bytes):
                while time.monotonic() < deadline:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        statuses[response.status] = statuses.get(response.status, 0) + 1

            bodies = (NOISY_HUGE, NOISY_MANY, NOISY_HUGE, NOISY_MANY)
            await asyncio.gather(*(loop(body) for body in bodies))

    asyncio.run(run())
    results.put(statuses)


def start_stub(*, nice: bool = False) -> subprocess.Popen:
    command = [sys.executable, "bench/upstream_stub.py", "--port", "0"]
    return subprocess.Popen(
        ["nice", "-n", "10", *command] if nice else command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def noisy_neighbour(args, workdir: Path) -> dict:
    # In a child: bench/runtime.py would shadow the runtime package here.
    tiny = workdir / "tiny-moe"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from runtime.tiny_moe import build_tiny_moe; build_tiny_moe(Path({str(tiny)!r}))",
        ],
        cwd=ROOT,
        check=True,
    )
    # A's replica would not be on the gateway's machine either: its stub is niced.
    stubs = [start_stub(nice=True), start_stub()]
    stub_a, stub_b = (stub.stdout.readline().split()[-1] for stub in stubs)
    recreate_database(SIROCCO_DB)
    env = {
        "DATABASE_URL": f"{POSTGRES}/{SIROCCO_DB}",
        "REDIS_URL": REDIS_URL,
        "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
        "GATEWAY_ORG_RPM_LIMIT": str(HUGE_LIMIT),
        "GATEWAY_ORG_TPM_LIMIT": str(HUGE_LIMIT),
        "SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "CELERY_BROKER_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
    }
    manage = [sys.executable, "manage.py"]
    full_env = {**os.environ, **env}
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=full_env, check=True)
    seed = NOISY_SEED.format(
        model=MODEL, stub_a=stub_a, stub_b=stub_b, artifacts=f"file://{tiny}", limit=HUGE_LIMIT
    )
    output = subprocess.run(
        [*manage, "shell", "-c", seed], cwd=ROOT, env=full_env, check=True,
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    key_a, key_b = output[-2], output[-1]
    port = free_port()
    server = start(
        [sys.executable, "-m", "uvicorn", "gateway.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log", "--log-level", "warning"],
        env, workdir / "sirocco-noisy.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process=server)
        # Warm up: B's caches, and A's tokenizer and prompt workers (one request each).
        asyncio.run(tenant_b_streams(url, key_b, args.rate, 1))
        httpx.post(url, content=NOISY_MANY, timeout=300,
                   headers={"authorization": f"Bearer {key_a}",
                            "content-type": "application/json"})  # fmt: skip
        load_before = os.getloadavg()
        context = multiprocessing.get_context("spawn")
        rounds = []
        # Alone and during the flood in turns: on a shared machine the noise between two runs
        # of the same thing is as large as what is measured, and shows here.
        for _ in range(args.rounds):
            alone = asyncio.run(tenant_b_streams(url, key_b, args.rate, args.duration))
            print("  B alone:", alone, flush=True)
            results = context.Queue()
            flood = context.Process(
                target=tenant_a_flood, args=(url, key_a, args.duration + 2, results)
            )
            flood.start()
            time.sleep(2)  # A's first bodies are being read
            during = asyncio.run(tenant_b_streams(url, key_b, args.rate, args.duration))
            statuses = results.get(timeout=600)
            flood.join(60)
            print("  B during A's flood:", during, "A's answers:", statuses, flush=True)
            rounds.append(
                {
                    "b_alone": alone,
                    "b_during_flood": during,
                    "a_statuses": {str(k): v for k, v in statuses.items()},
                }
            )
        return {
            "gateway_workers": 1,
            "rate": args.rate,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "rounds": rounds,
        }
    finally:
        stop(server)
        for stub in stubs:
            stop(stub)


def partner_comparison(args, workdir: Path) -> dict:
    """The partner-model rows: the fake Mistral API directly, and through the gateway."""
    from cryptography.fernet import Fernet

    sys.path.insert(0, str(ROOT))
    from tests.fakeprovider import TEST_API_KEY as PROVIDER_KEY

    provider = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeprovider", "--port", "0", "--api-key", PROVIDER_KEY],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    base = provider.stdout.readline().split()[-1]
    try:
        results = {"partner_direct": measure("partner_direct", base + "/v1", PROVIDER_KEY, args)}
        results["partner_sirocco"] = sirocco(
            "",
            args,
            workdir,
            seed=PARTNER_SEED.format(base=base + "/v1", model=MODEL, limit=HUGE_LIMIT),
            name="partner_sirocco",
            extra_env={"PROVIDER_CREDENTIAL_KEYS": Fernet.generate_key().decode()},
        )
        return results
    finally:
        stop(provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement")
    parser.add_argument("--rate", type=float, default=200, help="requests/s of the latency runs")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--litellm-venv", default="/work/bench-venv")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument(
        "--noisy-neighbour", action="store_true", help="only the noisy-neighbour run"
    )
    parser.add_argument("--rounds", type=int, default=3, help="noisy-neighbour rounds")
    parser.add_argument("--partner", action="store_true", help="only the partner-model rows")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    if args.noisy_neighbour:
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, {platform_name()}",
            "duration_s": args.duration,
            "noisy_neighbour": noisy_neighbour(args, workdir),
        }
        output = args.output.with_name("gateway-noisy-neighbour.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {output} (logs in {workdir})")
        return
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if args.partner:
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, {platform_name()}",
            "load_average_before": os.getloadavg(),
            "duration_s": args.duration,
            "rate": args.rate,
            "gateway_workers": args.workers,
        }
        stub_process = subprocess.Popen(
            [sys.executable, "bench/upstream_stub.py", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        stub = stub_process.stdout.readline().split()[-1]
        try:
            report["direct"] = measure("direct", stub + "/v1", "none", args)
            report["sirocco"] = sirocco(stub, args, workdir)
            report.update(partner_comparison(args, workdir))
        finally:
            stop(stub_process)
        report["load_average_after"] = os.getloadavg()
        summarize(report, names=("direct", "sirocco"))
        summarize(report, direct="partner_direct", names=("partner_direct", "partner_sirocco"))
        output = args.output.with_name("gateway-partner.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {output} (logs in {workdir})")
        return
    stub_process = subprocess.Popen(
        [sys.executable, "bench/upstream_stub.py", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stub = stub_process.stdout.readline().split()[-1]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform_name()}",
        "duration_s": args.duration,
        "rate": args.rate,
        "gateway_workers": args.workers,
    }
    try:
        report["django_overhead"] = django_overhead(args, workdir)
        report["clients"] = asyncio.run(client_comparison(stub))
        print("upstream clients:", report["clients"], flush=True)
        report["direct"] = measure("direct", stub + "/v1", "none", args)
        report["sirocco"] = sirocco(stub, args, workdir)
        report["sirocco_async_commit"] = sirocco(stub, args, workdir, synchronous_commit=False)
        report["sirocco_embedded"] = sirocco(stub, args, workdir, embedded=True)
        if not args.skip_litellm:
            report["litellm"] = litellm(stub, args, workdir)
        report.update(partner_comparison(args, workdir))
    finally:
        stop(stub_process)
    summarize(report)
    summarize(report, direct="partner_direct", names=("partner_direct", "partner_sirocco"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.output} (logs in {workdir})")


def platform_name() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"


def summarize(
    report: dict,
    *,
    direct: str = "direct",
    names=("direct", "sirocco", "sirocco_async_commit", "sirocco_embedded", "litellm"),
) -> None:
    rate = f"at_{report['rate']:.0f}_rps"
    print()
    baseline = direct
    for mode in ("non_streaming", "streaming"):
        direct = report[baseline][mode][rate]
        print(f"{mode}:")
        for name in names:
            data = report.get(name, {}).get(mode)
            if not data:
                continue
            at_rate = data[rate]
            line = (
                f"  {name:20} saturation {data['saturation']['requests_per_second']:>6} req/s"
                f"   p50 {at_rate['latency_p50_ms']:7.2f} ms  p99 {at_rate['latency_p99_ms']:7.2f} ms"
            )
            if name != baseline:
                line += (
                    f"   added p50 {at_rate['latency_p50_ms'] - direct['latency_p50_ms']:+.2f} ms"
                    f"  p99 {at_rate['latency_p99_ms'] - direct['latency_p99_ms']:+.2f} ms"
                )
                if mode == "streaming":
                    line += f"   TTFT added p50 {at_rate['ttft_p50_ms'] - direct['ttft_p50_ms']:+.2f} ms"
            print(line)


if __name__ == "__main__":
    main()
