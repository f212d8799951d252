"""A path id past any column's range (a 20-digit integer) is a 404 in problem JSON on every
REST route that takes one, never a 500 from the database's integer overflow."""

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from accounts.models import Role

HUGE = "9" * 20


def _int_routes(patterns, prefix=""):
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _int_routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern) and "<int:" in route and route.startswith("api/"):
            yield route


def _fill(route):
    route = re.sub(r"<int:\w+>", HUGE, route)
    return "/" + re.sub(r"<(?:str|slug):\w+>", "x", route).lstrip("^").rstrip("$")


@pytest.mark.parametrize("method", ["get", "patch", "post", "delete"])
def test_a_huge_path_id_is_a_404(organization, key_client, method):
    owner = key_client(organization, Role.OWNER)
    routes = sorted(set(_int_routes(get_resolver().url_patterns)))
    assert routes
    failures = []
    for route in routes:
        url = _fill(route)
        response = getattr(owner, method)(url, {}, format="json")
        if response.status_code not in (404, 405):
            failures.append((url, response.status_code))
        elif response.status_code == 404 and response.json().get("status") != 404:
            failures.append((url, response.content[:80]))
    assert not failures
