"""The chart's Ingress routes what customers need (the OpenAI API, the console, the REST API and
static files) and nothing else: /metrics, /readyz, /healthz and the Django admin stay inside the
cluster. Paths are matched the way Kubernetes matches them, against the console's real URLs."""

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from tests.helm.variants import VARIANTS

pytestmark = pytest.mark.nodb

OPERATIONS_PATHS = ["/metrics", "/readyz", "/healthz", "/admin/", "/admin/login/"]


def backend_for(ingress: dict, path: str) -> str | None:
    """The Service an Ingress sends `path` to: Exact, then the longest Prefix, element-wise
    (https://kubernetes.io/docs/concepts/services-networking/ingress/#examples)."""
    elements = [e for e in path.split("/") if e]
    best, best_length = None, -1
    for rule in ingress["spec"]["rules"]:
        for route in rule["http"]["paths"]:
            service = route["backend"]["service"]["name"]
            if route["pathType"] == "Exact" and route["path"] == path:
                return service
            prefix = [e for e in route["path"].split("/") if e]
            matches = route["pathType"] == "Prefix" and elements[: len(prefix)] == prefix
            if matches and len(prefix) > best_length:
                best, best_length = service, len(prefix)
    return best


def console_paths() -> list[str]:
    """One concrete path per URL pattern of the console (converters filled in)."""
    resolver = next(
        p
        for p in get_resolver().url_patterns
        if isinstance(p, URLResolver) and p.namespace == "console"
    )
    paths = []
    for pattern in resolver.url_patterns:
        assert isinstance(pattern, URLPattern)
        route = re.sub(r"<uuid:\w+>", "0b6f4a9e-5c1d-4f3e-9a2b-1c2d3e4f5a6b", str(pattern.pattern))
        paths.append("/" + re.sub(r"<\w+:\w+>|<\w+>", "x", route))
    return paths


@pytest.fixture(scope="module")
def ingress(render):
    return render(VARIANTS["ingress-tls"]).get("Ingress", "sirocco")


def test_customers_reach_the_console_the_rest_api_static_files_and_the_gateway(ingress):
    assert backend_for(ingress, "/v1/chat/completions") == "sirocco-gateway"
    assert backend_for(ingress, "/v1/models") == "sirocco-gateway"
    for path in ["/api/v1/models", "/api/v1/billing/stripe/webhook", "/api/schema/", "/api/docs/"]:
        assert backend_for(ingress, path) == "sirocco-web", path
    assert backend_for(ingress, "/static/console/console.css") == "sirocco-web"
    paths = console_paths()
    assert "/" in paths and "/login/" in paths
    unrouted = [path for path in paths if backend_for(ingress, path) != "sirocco-web"]
    assert unrouted == [], "console pages the Ingress does not route (_helpers.tpl)"


def test_operations_endpoints_are_never_routed(ingress):
    for path in OPERATIONS_PATHS:
        assert backend_for(ingress, path) is None, path
    # A prefix of a console page's name is not a route of its own.
    assert backend_for(ingress, "/metrics-and-more") is None


def test_the_admin_is_routed_only_when_the_operator_asks(render):
    values = {**VARIANTS["ingress-tls"]}
    values["ingress"] = {**values["ingress"], "exposeAdmin": True}
    ingress = render(values).get("Ingress", "sirocco")
    assert backend_for(ingress, "/admin/login/") == "sirocco-web"
    for path in ["/metrics", "/readyz", "/healthz"]:
        assert backend_for(ingress, path) is None, path


def test_the_metrics_token_comes_from_the_secret(render):
    rendered = render(
        {
            "secrets": {
                "create": True,
                "databaseUrl": "postgres://db/s",
                "redisUrl": "redis://r:6379/0",
                "metricsToken": "0123456789abcdef0123",
            }
        }
    )
    secret = rendered.get("Secret", "sirocco")
    assert secret["stringData"]["METRICS_TOKEN"] == "0123456789abcdef0123"
    env = {e["name"]: e for e in rendered.container("web")["env"]}
    assert env["METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "sirocco",
        "key": "METRICS_TOKEN",
        "optional": True,
    }
