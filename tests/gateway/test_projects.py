"""Projects at the gateway, against the real gateway under uvicorn and a stand-in replica:
allow-lists (a model outside one is a 404 exactly like an unknown one), a project over its
budget while its organization is not, a project's own rate limits, and cost attribution
(`user` and `metadata` stored on the usage event; past a bound, a 400)."""

import asyncio
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.projects import project_create
from metering.models import UsageEvent, UsageTag
from tests.gateway.test_bad_input import CHAT, assert_error

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(gateway, organization, make_deployment, upstream_server, make_api_key):
    """Deployments "chat" and "other" (shared), a project "search" allowed only "chat"."""
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    make_deployment(organization, name="other", endpoints=[upstream_server.url])
    search = project_create(
        actor=Actor.system(organization), name="search", allowed_models=["chat"]
    )
    clients = []

    def client_for(project=None, **fields):
        _key, secret = make_api_key(
            organization, scopes=[APIKey.Scope.INFERENCE], project=project, **fields
        )
        client = httpx.Client(base_url=gateway.v1, headers={"authorization": f"Bearer {secret}"})
        clients.append(client)
        return client

    yield search, client_for
    for client in clients:
        client.close()


def chat(client, model="chat", **extra):
    return client.post("/chat/completions", json={"model": model, "messages": CHAT, **extra})


def test_a_model_outside_the_allow_list_is_404_like_an_unknown_one(
    setup, organization, make_deployment, upstream_server
):
    search, client_for = setup
    client = client_for(search)
    assert chat(client).status_code == 200
    outside = assert_error(chat(client, "other"), 404, code="model_not_found")
    unknown = assert_error(chat(client, "nonexistent"), 404, code="model_not_found")
    assert outside["message"] == unknown["message"].replace("nonexistent", "other")
    assert [m["id"] for m in client.get("/models").json()["data"]] == ["chat"]
    assert client.get("/models/other").status_code == 404
    # A key narrows its project's list further; an empty intersection calls nothing.
    narrow = client_for(search, allowed_models=["other"])
    assert_error(chat(narrow), 404, code="model_not_found")
    assert narrow.get("/models").json()["data"] == []
    # The default project (no list) calls both; a deployment of "search" that is not shared
    # is not callable from it.
    make_deployment(
        organization, name="private", endpoints=[upstream_server.url], project=search, shared=False
    )
    default = client_for()
    assert chat(default, "other").status_code == 200
    assert_error(chat(default, "private"), 404, code="model_not_found")
    assert "private" not in [m["id"] for m in default.get("/models").json()["data"]]
    # Only what was served was recorded, each in the caller's project.
    assert sorted(UsageEvent.objects.values_list("model", "project_id")) == [
        ("chat", search.pk),
        ("other", default_project_id(organization)),
    ]


def default_project_id(organization):
    return organization.projects.get(is_default=True).pk


def test_a_project_over_its_budget_is_refused_while_its_organization_is_not(setup, organization):
    search, client_for = setup
    organization.monthly_spend_limit = Decimal("100.00")
    organization.save(update_fields=["monthly_spend_limit"])
    search.monthly_budget = Decimal("0")
    search.save(update_fields=["monthly_budget"])
    over = client_for(search)
    error = assert_error(chat(over), 429, type_="insufficient_quota", code="insufficient_quota")
    assert "project's monthly budget" in error["message"]
    # The rest of the organization goes on.
    assert chat(client_for()).status_code == 200
    assert not UsageEvent.objects.filter(project_id=search.pk).exists()


def test_a_projects_rate_limit_is_its_own(setup, organization):
    search, client_for = setup
    search.rpm_limit = 2
    search.save(update_fields=["rpm_limit"])
    first, second = client_for(search), client_for(search)
    assert chat(first).status_code == 200
    assert chat(second).status_code == 200
    response = chat(first)
    error = assert_error(response, 429, code="rate_limit_exceeded")
    assert "your project" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert chat(client_for()).status_code == 200  # another project: not limited


def test_user_and_metadata_are_stored_on_the_usage_event(setup):
    search, client_for = setup
    client = client_for(search)
    response = chat(client, user="end-user-42", metadata={"team": "ads", "feature": "summary"})
    assert response.status_code == 200, response.text
    event = UsageEvent.objects.get()
    assert (event.end_user, event.tags, event.project_id) == (
        "end-user-42",
        {"feature": "summary", "team": "ads"},
        search.pk,
    )
    assert set(UsageTag.objects.values_list("key", "value")) == {
        ("team", "ads"),
        ("feature", "summary"),
    }


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"metadata": {"team": "x" * 513}}, "metadata.team", "the most is 512"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "not allowed"),
        ({"metadata": {"bad key": "v"}}, "metadata", "not allowed"),
        ({"metadata": {"team": 7}}, "metadata.team", "must be a string"),
        ({"metadata": ["team"]}, "metadata", "must be an object"),
        ({"user": "u" * 257}, "user", "the most is 256"),
        ({"user": 42}, "user", "must be a string"),
    ],
)
def test_tags_past_their_bounds_are_a_clear_400(setup, extra, param, says):
    _search, client_for = setup
    assert_error(
        chat(client_for(), **extra),
        400,
        type_="invalid_request_error",
        param=param,
        says=says,
    )
    assert not UsageEvent.objects.exists()


def test_an_organizations_tag_cardinality_is_bounded(setup, gateway):
    gateway.reset(tag_values_per_organization=3)
    _search, client_for = setup
    client = client_for()
    for value in ("a", "b", "c"):
        assert chat(client, metadata={"run": value}).status_code == 200
    error = assert_error(
        chat(client, metadata={"run": "d"}), 400, code="metadata_cardinality_exceeded"
    )
    assert "the most is 3" in error["message"]
    # Known pairs still pass; the refused one was not registered.
    assert chat(client, metadata={"run": "a"}).status_code == 200
    assert UsageTag.objects.count() == 3


def test_embeddings_honour_the_allow_list(setup):
    search, client_for = setup
    client = client_for(search)
    outside = client.post("/embeddings", json={"model": "other", "input": "hi"})
    unknown = client.post("/embeddings", json={"model": "nonexistent", "input": "hi"})
    assert_error(outside, 404, code="model_not_found")
    assert outside.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        "nonexistent", "other"
    )
    assert not UsageEvent.objects.exists()


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the SQLite test database is shared-cache memory, where a racing lock fails at once",
)
def test_tag_cardinality_holds_when_50_new_values_race(setup, gateway):
    """50 concurrent requests, each with a new value, against a bound of 5: exactly 5 pass
    (the organization's row is locked while pairs are counted), the rest are a clear 400,
    never a 500, and the registry holds 5 pairs."""
    gateway.reset(tag_values_per_organization=5)
    _search, client_for = setup
    headers = dict(client_for().headers)

    async def race():
        async with httpx.AsyncClient(base_url=gateway.v1, headers=headers, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/chat/completions",
                        json={"model": "chat", "messages": CHAT, "metadata": {"run": f"r{i}"}},
                    )
                    for i in range(50)
                )
            )

    responses = asyncio.run(race())
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 5 + [400] * 45, statuses
    for response in responses:
        if response.status_code == 400:
            assert response.json()["error"]["code"] == "metadata_cardinality_exceeded"
    assert UsageTag.objects.count() == 5
    assert UsageEvent.objects.count() == 5


@pytest.mark.parametrize(
    "name", ["Chat", "CHAT", " chat", "chat ", "chat\u200b", "\uff43hat", "ch\u0430t"]
)
def test_a_name_trick_does_not_pass_the_allow_list(
    setup, name, organization, make_deployment, upstream_server
):
    """A project allowed only "chat" asks for a look-alike (case, whitespace, a zero-width
    space, fullwidth or Cyrillic letters): a 404 exactly like an unknown model, and nothing is
    billed; names are compared exactly on both the route and the allow-list."""
    search, client_for = setup
    # Even where the look-alike is a real deployment of the organization, outside the list.
    make_deployment(organization, name=name, endpoints=[upstream_server.url])
    assert_error(chat(client_for(search), name), 404, code="model_not_found")
    assert not UsageEvent.objects.exists()
    assert chat(client_for(), name).status_code == 200  # a key outside the project may
