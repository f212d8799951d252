"""Database faults against a real web server process (uvicorn, the production ASGI app): a SQLite
write lock held past the write timeout, and PostgreSQL behind a TCP proxy that is cut and
restored. Every REST answer stays problem JSON; a fault is a 503 with Retry-After; reads do not
wait for writes; once the database is back, so is the API."""

import concurrent.futures
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "database-outage-test-key-" + "x" * 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(port, path, *, key=None, body=None, timeout=60.0):
    """(status, headers, parsed JSON or text) for one request to the server."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


def assert_503_problem(answer, code):
    status, headers, body = answer
    assert status == 503, answer
    assert headers["Content-Type"] == "application/problem+json", answer
    assert body["code"] == code, body
    assert int(headers["Retry-After"]) > 0


@contextlib.contextmanager
def web_server(env, log: Path):
    port = free_port()
    output = log.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "controlplane.asgi:application",
            "--port",
            str(port),
            "--no-access-log",
            "--lifespan",
            "on",
        ],
        cwd=ROOT,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.3)
        yield port
    finally:
        output.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(port) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


def base_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "TEST_DATABASE_NAME"}
    }
    return {**env, "SECRET_KEY": SECRET_KEY, "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "text", **extra}


CREATE_KEY = """
from accounts.actors import Actor
from accounts.models import APIKey, Organization
from accounts.services import api_key_create
organization, _ = Organization.objects.get_or_create(slug="faults", defaults={"name": "Faults"})
_key, secret = api_key_create(actor=Actor.system(organization), name="faults",
    scopes=[APIKey.Scope.INFERENCE, APIKey.Scope.MANAGEMENT], role="admin")
print(secret)
"""


@pytest.mark.slow
@pytest.mark.nodb
def test_a_sqlite_write_lock_held_past_the_timeout_is_a_503_and_reads_do_not_wait(tmp_path):
    env = base_env(SIROCCO_VAR_DIR=str(tmp_path), SQLITE_BUSY_TIMEOUT="3")
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    key = subprocess.run(
        [*manage, "shell", "-c", CREATE_KEY],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]

    with web_server(env, tmp_path / "web.log") as port:
        assert call(port, "/api/v1/api-keys", key=key)[0] == 200
        # Another writer holds SQLite's write lock (WAL: readers go on, writers queue).
        holder = sqlite3.connect(tmp_path / "sirocco.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                started = time.monotonic()
                write = pool.submit(
                    call, port, "/api/v1/api-keys", key=key, body={"name": "while locked"}
                )
                # A read is not queued behind the write lock (authentication writes nothing).
                status, _, body = call(port, "/api/v1/organizations/current", key=key, timeout=10)
                assert status == 200 and body["slug"] == "faults"
                assert time.monotonic() - started < 2.5, "the read waited for the lock"
                status, _, body = call(port, "/readyz", timeout=10)
                assert status == 503 and body["checks"]["database"] == "busy", body
                assert_503_problem(write.result(timeout=30), "database_busy")
                assert time.monotonic() - started >= 3, "the write waited for the lock first"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        status, _, body = call(port, "/api/v1/api-keys", key=key, body={"name": "after"})
        assert status == 201, body
        assert call(port, "/readyz")[0] == 200


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="needs PostgreSQL"
)
def test_postgresql_cut_and_restored_behind_a_proxy(
    transactional_db, organization, make_api_key, tmp_path
):
    from django.db import connection

    _key, key = make_api_key(organization)
    settings_dict = connection.settings_dict
    with FaultProxy(
        settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432)
    ) as proxy:
        env = base_env(
            DATABASE_URL=(
                f"postgres://{settings_dict['USER']}@127.0.0.1:{proxy.port}/{settings_dict['NAME']}"
            ),
            REDIS_URL=os.environ.get("REDIS_URL", ""),
            CELERY_BROKER_URL=os.environ.get("CELERY_BROKER_URL", ""),
            DATABASE_CONNECT_TIMEOUT="2",
        )
        with web_server(env, tmp_path / "web.log") as port:
            status, _, body = call(port, "/api/v1/organizations/current", key=key)
            assert status == 200 and body["slug"] == organization.slug

            for mode in ("refuse", "reset"):
                proxy.cut(mode)
                started = time.monotonic()
                assert_503_problem(
                    call(port, "/api/v1/organizations/current", key=key), "database_unavailable"
                )
                assert_503_problem(
                    call(port, "/api/v1/api-keys", key=key, body={"name": "down"}),
                    "database_unavailable",
                )
                status, _, body = call(port, "/readyz")
                assert status == 503 and body["checks"]["database"] == "unavailable", body
                assert time.monotonic() - started < 10, "a refused database answers fast"

                proxy.restore()
                deadline = time.monotonic() + 15
                while (answer := call(port, "/api/v1/organizations/current", key=key))[0] != 200:
                    assert answer[0] == 503, answer
                    assert time.monotonic() < deadline, answer
                    time.sleep(0.2)
                status, _, body = call(port, "/api/v1/api-keys", key=key, body={"name": mode})
                assert status == 201, body
                assert call(port, "/readyz")[0] == 200
    _wait_for_other_sessions_to_end(connection)


def _wait_for_other_sessions_to_end(connection, timeout=10.0):
    """The server's sessions end a moment after it and the proxy stop; the test database can
    only be dropped once they have."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.1)


def _postgres_env(settings_dict, port, **extra):
    return base_env(
        DATABASE_URL=f"postgres://{settings_dict['USER']}@127.0.0.1:{port}/{settings_dict['NAME']}",
        REDIS_URL=os.environ.get("REDIS_URL", ""),
        CELERY_BROKER_URL=os.environ.get("CELERY_BROKER_URL", ""),
        **extra,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="needs PostgreSQL"
)
def test_postgresql_that_hangs_mid_request_is_a_503_within_a_bound_and_the_api_recovers(
    transactional_db, organization, make_api_key, tmp_path
):
    """A blackhole under an open connection: the request's statement is on the server, and
    from then on nothing comes back (a stuck server, a dropped network behind something that
    still acknowledges). The server's own timeouts cannot help (its answer is lost); the web
    process's client-side bound must. To have the statement in flight when the cut comes, it
    waits on a lock held by the test; the lock is released once the answer can no longer
    arrive."""
    import psycopg
    from django.db import connection

    _key, key = make_api_key(organization)
    settings_dict = connection.settings_dict
    host, pg_port = settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432)
    with FaultProxy(host, pg_port) as proxy:
        # The client gives up 3 s past the statement timeout: 5 s. A new connection: 2 s.
        env = _postgres_env(
            settings_dict,
            proxy.port,
            DATABASE_CONNECT_TIMEOUT="2",
            DATABASE_STATEMENT_TIMEOUT="2",
            DATABASE_LOCK_TIMEOUT="2",
        )
        with (
            web_server(env, tmp_path / "web.log") as port,
            psycopg.connect(
                host=host, port=pg_port, user=settings_dict["USER"], dbname=settings_dict["NAME"]
            ) as holder,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            status, _, body = call(port, "/api/v1/organizations/current", key=key)
            assert status == 200 and body["slug"] == organization.slug

            holder.execute("LOCK TABLE accounts_apikey IN SHARE ROW EXCLUSIVE MODE")
            started = time.monotonic()
            write = pool.submit(
                call, port, "/api/v1/api-keys", key=key, body={"name": "hung"}, timeout=30
            )
            _wait_for_a_lock_wait(holder)
            proxy.cut("blackhole")
            holder.rollback()  # the server answers now; the answer is dropped
            assert_503_problem(write.result(timeout=40), "database_unavailable")
            assert time.monotonic() - started < 15, "a hung database answers within a bound"

            # New connections hang too: bounded by the connect timeout.
            started = time.monotonic()
            assert_503_problem(
                call(port, "/api/v1/organizations/current", key=key, timeout=30),
                "database_unavailable",
            )
            assert time.monotonic() - started < 15

            proxy.restore()
            deadline = time.monotonic() + 20
            while (answer := call(port, "/api/v1/organizations/current", key=key))[0] != 200:
                assert answer[0] == 503, answer
                assert time.monotonic() < deadline, answer
                time.sleep(0.2)
            status, _, body = call(port, "/api/v1/api-keys", key=key, body={"name": "after"})
            assert status == 201, body
    _wait_for_other_sessions_to_end(connection)


def _wait_for_a_lock_wait(holder, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder.execute("SELECT pg_stat_clear_snapshot()")  # else one snapshot per transaction
        row = holder.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
        if row[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the request never waited for the lock")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="needs PostgreSQL"
)
def test_a_postgresql_lock_held_past_lock_timeout_is_a_503_busy(
    transactional_db, organization, make_api_key, tmp_path
):
    import psycopg
    from django.db import connection

    _key, key = make_api_key(organization)
    settings_dict = connection.settings_dict
    env = _postgres_env(
        settings_dict,
        int(settings_dict["PORT"] or 5432),
        DATABASE_STATEMENT_TIMEOUT="5",
        DATABASE_LOCK_TIMEOUT="1",
    )
    with web_server(env, tmp_path / "web.log") as port:
        assert call(port, "/api/v1/api-keys", key=key)[0] == 200
        # Another session blocks inserts into the key table (reads still go on) and holds on.
        with psycopg.connect(
            host=settings_dict["HOST"] or "127.0.0.1",
            port=int(settings_dict["PORT"] or 5432),
            user=settings_dict["USER"],
            dbname=settings_dict["NAME"],
        ) as holder:
            holder.execute("LOCK TABLE accounts_apikey IN SHARE ROW EXCLUSIVE MODE")
            started = time.monotonic()
            answer = call(port, "/api/v1/api-keys", key=key, body={"name": "while locked"})
            waited = time.monotonic() - started
            holder.rollback()
        assert_503_problem(answer, "database_busy")
        assert 1 <= waited < 5, waited
        status, _, body = call(port, "/api/v1/api-keys", key=key, body={"name": "after"})
        assert status == 201, body
    _wait_for_other_sessions_to_end(connection)
