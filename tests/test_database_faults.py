"""Database faults answer in the API's language: a read-only database still serves every REST
read; a write gets a 503 problem JSON with Retry-After, never HTML and never the driver's text;
/readyz says the database is read-only. Both backends: SQLite through a read-only connection
(`PRAGMA query_only`, which SQLite enforces as it does a read-only file), PostgreSQL through a
read-only transaction (what a hot standby or `default_transaction_read_only` gives).

The lock and outage cases run against real server processes: tests/test_database_outages.py.
"""

import contextlib
import json

import pytest
from django.db import DatabaseError, connection, transaction
from django.test import Client, RequestFactory

from accounts.models import APIKey
from controlplane.rest.exceptions import server_error

pytestmark = pytest.mark.django_db


@contextlib.contextmanager
def read_only():
    """The test's database connection refuses every write until the block ends."""
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA query_only = ON")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA query_only = OFF")
        return
    # PostgreSQL: read-only from a savepoint on; rolling back to it makes the test's
    # transaction read-write again (its teardown checks deferred constraints, which locks).
    savepoint = transaction.savepoint()
    with connection.cursor() as cursor:
        cursor.execute("SET transaction_read_only = on")
    try:
        yield
    finally:
        transaction.savepoint_rollback(savepoint)


@pytest.fixture
def read_only_database(db):
    with read_only():
        yield


def assert_problem_503(response, code):
    assert response.status_code == 503, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["code"] == code and body["status"] == 503
    assert int(response["Retry-After"]) > 0
    text = response.content.decode().lower()
    for leak in ("readonly database", "read-only transaction", "operationalerror", "sqlstate"):
        assert leak not in text, "the driver's text never reaches the client"
    return body


def test_reads_work_and_writes_are_a_503_problem_on_a_read_only_database(
    organization, api, session_client
):
    key_count = APIKey.objects.count()
    browser, _user = session_client(organization)
    # The key is fresh: the first request it makes is under the fault (once that request wrote
    # the key's last_used_at, and failed).

    with read_only():
        for path in (
            "/api/v1/organizations/current",
            "/api/v1/models",
            "/api/v1/deployments",
            "/api/v1/api-keys",
            "/api/v1/usage",
            "/api/v1/invoices",
        ):
            assert api.get(path).status_code == 200, path  # API-key auth writes nothing
            assert browser.get(path).status_code == 200, path  # nor does a console session

        response = api.post("/api/v1/api-keys", {"name": "during the fault"}, format="json")
        body = assert_problem_503(response, "database_read_only")
        assert "read-only" in body["detail"] and body["request_id"]

        ready = Client().get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "read_only"
    assert APIKey.objects.count() == key_count


def test_readyz_names_the_failing_dependency_without_exception_text(db, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "broker": "unavailable"},
    }


def test_a_database_fault_outside_a_drf_view_is_a_503_too(read_only_database):
    """handler500: what middleware or a plain Django view raises. Under /api/ problem JSON, on
    console pages a short HTML page; both 503 with Retry-After for a database fault."""
    request = RequestFactory().get("/api/v1/organizations/current")
    try:
        with transaction.atomic():
            APIKey.objects.update(name="x")  # a real write, refused by the database
    except DatabaseError:
        api_response = server_error(request)
        page_response = server_error(RequestFactory().get("/deployments/"))
    assert_problem_503(api_response, "database_read_only")
    assert page_response.status_code == 503 and int(page_response["Retry-After"]) > 0
    assert b"read-only" in page_response.content


def test_a_bug_outside_a_drf_view_is_a_problem_500_under_api(db):
    request = RequestFactory().get("/api/v1/anything")
    try:
        raise RuntimeError("a bug, with details nobody outside should read")
    except RuntimeError:
        response = server_error(request)
    assert response.status_code == 500
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["code"] == "server_error"
    assert b"details nobody" not in response.content


def test_a_console_login_on_a_read_only_database_is_a_503_page(organization, make_member):
    """A real request through Django's handler: logging in writes (the session, last_login)."""
    user = make_member(organization).user
    user.set_password("pw-for-the-fault-test")
    user.save()
    client = Client(raise_request_exception=False)
    with read_only():
        response = client.post(
            "/login/", {"username": user.email, "password": "pw-for-the-fault-test"}
        )
    assert response.status_code == 503, response.content[:500]
    assert int(response["Retry-After"]) > 0
