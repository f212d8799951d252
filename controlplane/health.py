"""Liveness, readiness and Prometheus metrics for the web process.

/readyz names a failing dependency and what is wrong with it in a word ("unavailable",
"read_only", "busy"); the exception text goes to the log, never to the response (it can carry
host names, users and SQL).
"""

import logging

from django.conf import settings
from django.db import connection, transaction
from django.http import HttpResponse, JsonResponse
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.errors import database_fault
from controlplane.ops import metrics_refusal

logger = logging.getLogger(__name__)

# How long the SQLite write check waits for the write lock, in milliseconds. Requests wait up
# to the connection's own timeout (20 s); readiness should answer sooner than that.
SQLITE_PROBE_BUSY_MS = 2000


def healthz(request):
    """Alive: the process answers. Never touches a dependency (a DB outage must not restart us)."""
    return JsonResponse({"status": "ok"})


def _writable() -> str:
    """ "ok" when the database would accept a write now, "read_only" when it would refuse it;
    raises the database's error when it cannot answer. Writes nothing.

    PostgreSQL says so itself: `transaction_read_only` is on for a hot standby and under
    `default_transaction_read_only`. SQLite only finds out when a statement writes, so the
    check writes inside a transaction it rolls back: a read-only file or connection fails it,
    and a write lock held elsewhere for longer than SQLITE_PROBE_BUSY_MS makes it busy.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_read_only")
            return "read_only" if cursor.fetchone()[0] == "on" else "ok"
    if connection.vendor != "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        busy_ms = int(cursor.fetchone()[0])
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_PROBE_BUSY_MS}")
        try:
            with transaction.atomic():
                cursor.execute("CREATE TABLE sirocco_readiness_probe (id INTEGER)")
                transaction.set_rollback(True)
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
    return "ok"


def database_check() -> str:
    """ "ok", or in a word why the database cannot take writes: "read_only", "busy",
    "unavailable" ("error" for anything else, which the log explains)."""
    try:
        return _writable()
    except Exception as error:
        logger.warning("readiness: the database is not ready", exc_info=True)
        fault = database_fault(error)
        return fault.code.removeprefix("database_") if fault else "error"


def broker_check() -> str:
    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception:
        logger.warning("readiness: the Celery broker is not reachable", exc_info=True)
        return "unavailable"


def readyz(request):
    """Ready: the database accepts writes and the Celery broker answers. A 503 names the one that
    doesn't, and how, in a word."""
    checks = {"database": database_check(), "broker": broker_check()}
    failing = any(value != "ok" for value in checks.values())
    body = {"status": "unavailable" if failing else "ok", "checks": checks}
    return JsonResponse(body, status=503 if failing else 200)


def metrics(request):
    """Prometheus text, for the operators' scraper only (controlplane/ops.py says who)."""
    refusal = metrics_refusal(request.headers.get("Authorization"), request.META.get("REMOTE_ADDR"))
    if refusal is not None:
        status, message = refusal
        response = JsonResponse({"detail": message}, status=status)
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
