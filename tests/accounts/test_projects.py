"""Projects through the REST API: CRUD, project members and roles, keys per project,
allow-lists, tenancy (another tenant's project is a 404) and the audit trail."""

import pytest

from accounts.models import APIKey, AuditLogEntry, Project, ProjectMembership
from accounts.roles import Role
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


def test_every_organization_has_one_default_project_holding_new_keys(organization, api):
    default = Project.objects.get(organization=organization)
    assert default.is_default and default.name == "Default"
    listed = api.get("/api/v1/projects").json()["results"]
    assert [(p["name"], p["is_default"]) for p in listed] == [("Default", True)]
    created = api.post("/api/v1/api-keys", {"name": "plain"}, format="json").json()
    assert created["project"] == default.pk
    # A key a writer saved without naming one lands there too (model invariant).
    key = APIKey(organization=organization, name="raw", prefix="abcdefghijkl", secret_hash="x")
    key.save()
    assert key.project_id == default.pk


def test_project_crud_and_audit(organization, key_client):
    owner = key_client(organization, Role.OWNER)
    response = owner.post(
        "/api/v1/projects",
        {
            "name": "search",
            "rpm_limit": 60,
            "tpm_limit": 10_000,
            "monthly_budget": "25.00",
            "allowed_models": ["mixtral-prod", "mixtral-prod", " small "],
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    project = response.json()
    assert project["allowed_models"] == ["mixtral-prod", "small"]
    assert project["monthly_budget"] == "25.00"
    pid = project["id"]
    assert owner.post("/api/v1/projects", {"name": "search"}, format="json").status_code == 409
    patched = owner.patch(
        f"/api/v1/projects/{pid}", {"allowed_models": [], "monthly_budget": None}, format="json"
    )
    assert patched.status_code == 200
    assert patched.json()["allowed_models"] == [] and patched.json()["monthly_budget"] is None
    assert owner.get(f"/api/v1/projects/{pid}").json()["name"] == "search"
    actions = list(
        AuditLogEntry.objects.filter(organization=organization, target_type="accounts.project")
        .order_by("id")
        .values_list("action", "actor_label")
    )
    assert [a for a, _ in actions] == ["project.create", "project.update"]
    assert all(label.startswith("api-key sk-") for _, label in actions)
    assert owner.delete(f"/api/v1/projects/{pid}").status_code == 204
    assert not Project.objects.filter(pk=pid).exists()
    default = Project.objects.get(organization=organization, is_default=True)
    assert owner.delete(f"/api/v1/projects/{default.pk}").status_code == 409


def test_bad_input_is_a_clear_400(organization, key_client):
    owner = key_client(organization, Role.OWNER)
    for body, field in [
        ({"name": ""}, "name"),
        ({"name": "x", "allowed_models": ["no spaces allowed"]}, "allowed_models"),
        ({"name": "x", "allowed_models": "mixtral"}, "allowed_models"),
        ({"name": "x", "monthly_budget": 5}, "monthly_budget"),
        ({"name": "x", "rpm_limit": 0}, "rpm_limit"),
    ]:
        response = owner.post("/api/v1/projects", body, format="json")
        assert response.status_code == 400, (body, response.json())
        assert field in str(response.json()), (body, response.json())
    missing = owner.post("/api/v1/api-keys", {"name": "k", "project": 999_999}, format="json")
    assert missing.status_code == 400 and "project" in str(missing.json())


def test_budget_needs_billing_write_and_projects_need_organization_write(organization, key_client):
    admin = key_client(organization, Role.ADMIN)  # organization.write, no billing.write
    developer = key_client(organization, Role.DEVELOPER)
    assert developer.post("/api/v1/projects", {"name": "a"}, format="json").status_code == 403
    assert (
        admin.post(
            "/api/v1/projects", {"name": "a", "monthly_budget": "1.00"}, format="json"
        ).status_code
        == 403
    )
    pid = admin.post("/api/v1/projects", {"name": "a"}, format="json").json()["id"]
    billing = key_client(organization, Role.BILLING)
    assert (
        billing.patch(
            f"/api/v1/projects/{pid}", {"monthly_budget": "3.00"}, format="json"
        ).status_code
        == 200
    )
    assert (
        billing.patch(f"/api/v1/projects/{pid}", {"rpm_limit": 5}, format="json").status_code == 403
    )


@pytest.mark.parametrize(
    "path",
    [
        "projects/{pid}",
        "projects/{pid}/members",
        "projects/{pid}/api-keys",
        "projects/{pid}/budget",
    ],
)
@pytest.mark.parametrize("method", ["get", "patch", "post", "delete"])
def test_another_tenants_project_is_404(organization, other_organization, key_client, path, method):
    theirs = Project.objects.get(organization=other_organization)
    owner = key_client(organization, Role.OWNER)
    url = "/api/v1/" + path.format(pid=theirs.pk)
    response = getattr(owner, method)(
        url, {"name": "x", "email": "a@b.c", "role": "viewer"}, format="json"
    )
    assert response.status_code in (404, 405), (method, url, response.status_code)
    if response.status_code == 405:
        return
    assert response.json()["status"] == 404
    assert Project.objects.filter(pk=theirs.pk, name="Default").exists()


def test_project_role_grants_inside_that_project_only(organization, session_client, key_client):
    owner = key_client(organization, Role.OWNER)
    search = owner.post("/api/v1/projects", {"name": "search"}, format="json").json()["id"]
    ads = owner.post("/api/v1/projects", {"name": "ads"}, format="json").json()["id"]
    viewer_client, viewer = session_client(organization, Role.VIEWER)
    # An organization viewer cannot make keys...
    assert (
        viewer_client.post(
            f"/api/v1/projects/{search}/api-keys", {"name": "k"}, format="json"
        ).status_code
        == 403
    )
    added = owner.post(
        f"/api/v1/projects/{search}/members",
        {"email": viewer.email, "role": "developer"},
        format="json",
    )
    assert added.status_code == 201, added.json()
    # ...until a project role grants it, there and only there.
    made = viewer_client.post(
        f"/api/v1/projects/{search}/api-keys",
        {"name": "k", "allowed_models": ["mixtral-prod"]},
        format="json",
    )
    assert made.status_code == 201, made.json()
    assert made.json()["project"] == search and made.json()["key"].startswith("sk-")
    assert made.json()["allowed_models"] == ["mixtral-prod"]
    assert (
        viewer_client.post(
            f"/api/v1/projects/{ads}/api-keys", {"name": "k"}, format="json"
        ).status_code
        == 403
    )
    # A project developer cannot hand out more than they hold.
    too_much = viewer_client.post(
        f"/api/v1/projects/{search}/api-keys", {"name": "k", "role": "owner"}, format="json"
    )
    assert too_much.status_code == 403
    listed = viewer_client.get(f"/api/v1/projects/{search}/api-keys").json()["results"]
    assert [k["name"] for k in listed] == ["k"]
    # Allow-list of a key changed by PATCH, audited.
    key_id = made.json()["id"]
    patched = viewer_client.patch(
        f"/api/v1/api-keys/{key_id}", {"allowed_models": ["a", "b"]}, format="json"
    )
    assert patched.status_code == 200 and patched.json()["allowed_models"] == ["a", "b"]
    assert AuditLogEntry.objects.filter(action="api_key.update", target_id=str(key_id)).exists()


def test_project_members_must_belong_to_the_organization(organization, key_client):
    owner = key_client(organization, Role.OWNER)
    pid = owner.post("/api/v1/projects", {"name": "p"}, format="json").json()["id"]
    stranger = MembershipFactory(organization=OrganizationFactory())
    response = owner.post(
        f"/api/v1/projects/{pid}/members",
        {"email": stranger.user.email, "role": "viewer"},
        format="json",
    )
    assert response.status_code == 400
    member = MembershipFactory(organization=organization, role=Role.VIEWER)
    created = owner.post(
        f"/api/v1/projects/{pid}/members",
        {"email": member.user.email, "role": "admin"},
        format="json",
    ).json()
    assert (
        owner.patch(
            f"/api/v1/projects/{pid}/members/{created['id']}", {"role": "viewer"}, format="json"
        ).json()["role"]
        == "viewer"
    )
    # Leaving the organization drops the project roles.
    assert owner.delete(f"/api/v1/members/{member.pk}").status_code == 204
    assert not ProjectMembership.objects.filter(user=member.user).exists()


def test_deployments_record_their_project(organization, key_client):
    owner = key_client(organization, Role.OWNER)
    pid = owner.post("/api/v1/projects", {"name": "p"}, format="json").json()["id"]
    response = owner.post(
        "/api/v1/deployments",
        {"name": "d", "model": "nope", "project": 999_999},
        format="json",
    )
    assert response.status_code == 400 and "project" in str(response.json())
    assert pid
