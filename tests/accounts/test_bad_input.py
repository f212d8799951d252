import pytest

from accounts.models import APIKey, AuditLogEntry, Organization

pytestmark = pytest.mark.django_db


def assert_problem(response, status, field=None):
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["detail"]
    assert body["request_id"] == response["X-Request-ID"]
    if field:
        assert field in [error["field"] for error in body["errors"]], body


def test_malformed_json(api):
    response = api.generic("POST", "/api/v1/api-keys", "{not json", content_type="application/json")
    assert_problem(response, 400)
    assert "JSON parse error" in response.json()["detail"]


def test_unknown_fields_are_rejected_by_name(api):
    response = api.post("/api/v1/api-keys", {"name": "k", "scope": ["inference"]}, format="json")
    assert_problem(response, 400, field="scope")
    assert "Writable fields are" in response.json()["errors"][0]["message"]
    assert not APIKey.objects.filter(name="k").exists()


def test_wrong_types(api):
    assert_problem(
        api.post("/api/v1/api-keys", {"name": "k", "rpm_limit": "lots"}, format="json"),
        400,
        "rpm_limit",
    )
    assert_problem(
        api.post("/api/v1/api-keys", {"name": "k", "scopes": "inference"}, format="json"),
        400,
        "scopes",
    )
    assert_problem(api.post("/api/v1/api-keys", ["name"], format="json"), 400)
    assert_problem(
        api.patch("/api/v1/organizations/current", {"currency": "dollars"}, format="json"),
        400,
        "currency",
    )


def test_missing_required_field(api):
    assert_problem(api.post("/api/v1/api-keys", {}, format="json"), 400, "name")


def test_missing_auth_is_401_with_www_authenticate(client):
    response = client.get("/api/v1/api-keys")
    assert_problem(response, 401)
    assert response["WWW-Authenticate"] == 'Bearer realm="sirocco"'


def test_unknown_query_parameter_and_ordering_are_400(api):
    assert_problem(api.get("/api/v1/api-keys?revokd=true"), 400, "revokd")
    assert_problem(api.get("/api/v1/api-keys?ordering=secret_hash"), 400, "ordering")
    assert_problem(api.get("/api/v1/api-keys?revoked=maybe"), 400, "revoked")
    assert api.get("/api/v1/api-keys?ordering=-name&revoked=false").status_code == 200


def test_a_failed_write_leaves_nothing_behind(api, organization):
    before = AuditLogEntry.objects.count()
    response = api.patch(
        "/api/v1/organizations/current",
        {"name": "Renamed", "monthly_spend_limit": "-5"},
        format="json",
    )
    assert_problem(response, 400, "monthly_spend_limit")
    organization.refresh_from_db()
    assert organization.name != "Renamed"
    assert AuditLogEntry.objects.count() == before


def test_method_not_allowed_is_problem_json(api):
    assert_problem(api.put("/api/v1/organizations/current", {}, format="json"), 405)


def test_organization_update_round_trip(api, organization):
    response = api.patch(
        "/api/v1/organizations/current", {"name": "Acme", "currency": "EUR"}, format="json"
    )
    assert response.status_code == 200
    assert Organization.objects.get(pk=organization.pk).currency == "EUR"
    entry = AuditLogEntry.objects.get(action="organization.update")
    assert entry.changes["currency"] == ["USD", "EUR"]
