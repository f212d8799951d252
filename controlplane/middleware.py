import logging
import re
import time
import uuid

from prometheus_client import Counter, Histogram

from controlplane.logging import request_id_var

logger = logging.getLogger("sirocco.request")

# A client-supplied id is kept only when it is short and harmless in logs and headers.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

HTTP_REQUESTS = Counter(
    "sirocco_http_requests_total",
    "HTTP requests served by the web process",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "sirocco_http_request_duration_seconds", "Time to produce the response", ["method", "route"]
)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every request an id (or keeps the caller's `X-Request-ID`), logs it, returns it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.headers.get("X-Request-ID", "")
        request.id = supplied if _VALID_REQUEST_ID.match(supplied) else new_request_id()
        token = request_id_var.set(request.id)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            response["X-Request-ID"] = request.id
            logger.info(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={"duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            return response
        finally:
            request_id_var.reset(token)


class PrometheusMiddleware:
    """Counts requests and their latency by route pattern (not raw path: bounded labels)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = match.route if match and match.route else "unmatched"
        HTTP_REQUESTS.labels(request.method, route, response.status_code).inc()
        HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
        return response
