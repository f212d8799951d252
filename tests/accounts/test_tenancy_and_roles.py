import pytest

from accounts.models import AuditLogEntry, Membership
from accounts.roles import Role
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def foreign_objects(other_organization, make_api_key):
    membership = MembershipFactory(organization=other_organization, role=Role.DEVELOPER)
    key, _secret = make_api_key(other_organization)
    return {"members": membership.pk, "api-keys": key.pk}


@pytest.mark.parametrize("collection", ["members", "api-keys"])
@pytest.mark.parametrize("method", ["get", "patch", "delete"])
def test_another_tenants_object_is_404(api, foreign_objects, collection, method):
    response = getattr(api, method)(
        f"/api/v1/{collection}/{foreign_objects[collection]}", {}, format="json"
    )
    # (A key's name and allow-list can be changed since projects; its secret never.)
    assert response.status_code == 404
    assert response.json()["status"] == 404


@pytest.mark.parametrize("path", ["/api/v1/members", "/api/v1/api-keys", "/api/v1/audit-log"])
def test_lists_show_only_the_callers_organization(
    api, organization, other_organization, foreign_objects, path
):
    MembershipFactory(organization=organization, role=Role.VIEWER)
    api.post("/api/v1/api-keys", {"name": "mine"}, format="json")
    results = api.get(path).json()["results"]
    assert results, "the caller's own rows are listed"
    if path.endswith("members"):
        org_ids = set(
            Membership.objects.filter(pk__in=[r["id"] for r in results]).values_list(
                "organization", flat=True
            )
        )
    elif path.endswith("api-keys"):
        from accounts.models import APIKey

        org_ids = set(
            APIKey.objects.filter(pk__in=[r["id"] for r in results]).values_list(
                "organization", flat=True
            )
        )
    else:
        org_ids = set(
            AuditLogEntry.objects.filter(pk__in=[r["id"] for r in results]).values_list(
                "organization", flat=True
            )
        )
    assert org_ids == {organization.pk}


def test_current_organization_is_the_keys(api, organization):
    assert api.get("/api/v1/organizations/current").json()["slug"] == organization.slug


# (role, method, path, body, expected status)
ROLE_MATRIX = [
    (Role.VIEWER, "get", "/api/v1/organizations/current", None, 200),
    (Role.VIEWER, "get", "/api/v1/members", None, 200),
    (Role.VIEWER, "get", "/api/v1/api-keys", None, 403),
    (Role.VIEWER, "post", "/api/v1/api-keys", {"name": "k"}, 403),
    (Role.VIEWER, "get", "/api/v1/audit-log", None, 403),
    (Role.VIEWER, "patch", "/api/v1/organizations/current", {"name": "N"}, 403),
    (Role.DEVELOPER, "post", "/api/v1/api-keys", {"name": "k"}, 201),
    (Role.DEVELOPER, "post", "/api/v1/members", {"email": "a@b.co", "role": "viewer"}, 403),
    (Role.DEVELOPER, "patch", "/api/v1/organizations/current", {"monthly_spend_limit": "10"}, 403),
    (Role.BILLING, "patch", "/api/v1/organizations/current", {"monthly_spend_limit": "10.00"}, 200),
    (Role.BILLING, "patch", "/api/v1/organizations/current", {"name": "N"}, 403),
    (Role.BILLING, "get", "/api/v1/api-keys", None, 403),
    (Role.ADMIN, "post", "/api/v1/members", {"email": "a@b.co", "role": "developer"}, 201),
    (Role.ADMIN, "post", "/api/v1/members", {"email": "a@b.co", "role": "owner"}, 403),
    (Role.ADMIN, "get", "/api/v1/audit-log", None, 200),
    (Role.ADMIN, "patch", "/api/v1/organizations/current", {"monthly_spend_limit": "10"}, 403),
    (Role.OWNER, "post", "/api/v1/members", {"email": "a@b.co", "role": "owner"}, 201),
    (
        Role.OWNER,
        "patch",
        "/api/v1/organizations/current",
        {"monthly_spend_limit": "10", "name": "N"},
        200,
    ),
]


@pytest.mark.parametrize(("role", "method", "path", "body", "expected"), ROLE_MATRIX)
def test_roles_over_sessions(session_client, organization, role, method, path, body, expected):
    client, _user = session_client(organization, role)
    response = (
        getattr(client, method)(path, body, format="json")
        if body is not None
        else getattr(client, method)(path)
    )
    assert response.status_code == expected, response.content
    if expected == 403:
        assert response.json()["code"] == "permission_denied"
        assert role in response.json()["detail"]


@pytest.mark.parametrize(("role", "method", "path", "body", "expected"), ROLE_MATRIX)
def test_roles_over_api_keys(key_client, organization, role, method, path, body, expected):
    client = key_client(organization, role)
    response = (
        getattr(client, method)(path, body, format="json")
        if body is not None
        else getattr(client, method)(path)
    )
    assert response.status_code == expected, response.content


def test_session_writes_need_csrf(session_client, organization):
    from rest_framework.test import APIClient

    _, user = session_client(organization, Role.OWNER)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.patch("/api/v1/organizations/current", {"name": "N"}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


def test_a_user_without_organization_is_403(db):
    from rest_framework.test import APIClient

    from tests.factories import UserFactory

    client = APIClient()
    client.force_login(UserFactory())
    response = client.get("/api/v1/organizations/current")
    assert response.status_code == 403


def test_the_last_owner_cannot_leave_or_be_demoted(session_client, organization):
    client, user = session_client(organization, Role.OWNER)
    me = Membership.objects.get(user=user)
    response = client.patch(f"/api/v1/members/{me.pk}", {"role": "viewer"}, format="json")
    assert response.status_code == 409
    assert client.delete(f"/api/v1/members/{me.pk}").status_code == 409
    me.refresh_from_db()
    assert me.role == Role.OWNER


def test_member_lifecycle_is_audited(api, organization):
    created = api.post(
        "/api/v1/members", {"email": "New@Example.com", "role": "viewer"}, format="json"
    )
    assert created.status_code == 201
    assert created.json()["email"] == "new@example.com"
    duplicate = api.post(
        "/api/v1/members", {"email": "new@example.com", "role": "viewer"}, format="json"
    )
    assert duplicate.status_code == 409
    member_id = created.json()["id"]
    assert (
        api.patch(f"/api/v1/members/{member_id}", {"role": "developer"}, format="json").json()[
            "role"
        ]
        == "developer"
    )
    assert api.delete(f"/api/v1/members/{member_id}").status_code == 204
    actions = list(
        AuditLogEntry.objects.filter(organization=organization, target_type="accounts.membership")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["member.add", "member.update", "member.remove"]
    log = api.get("/api/v1/audit-log?action=member.add").json()["results"]
    assert [entry["action"] for entry in log] == ["member.add"]
    assert log[0]["actor"].startswith("api-key sk-")
