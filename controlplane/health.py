"""Liveness, readiness and Prometheus metrics for the web process."""

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.ops import metrics_refusal


def healthz(request):
    """Alive: the process answers. Never touches a dependency (a DB outage must not restart us)."""
    return JsonResponse({"status": "ok"})


def _database_ok() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _broker_ok() -> str | None:
    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def readyz(request):
    """Ready: the database and the Celery broker answer. 503 names the one that doesn't."""
    checks = {"database": _database_ok(), "broker": _broker_ok()}
    failing = {name: error for name, error in checks.items() if error}
    body = {
        "status": "unavailable" if failing else "ok",
        "checks": {name: error or "ok" for name, error in checks.items()},
    }
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
