import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create

pytestmark = pytest.mark.django_db


def test_creating_a_key_shows_the_secret_once(console, organization):
    client = console(organization, Role.DEVELOPER)
    response = client.post(
        "/api-keys/", {"name": "backend", "scopes": ["inference"], "role": "developer"}
    )
    assert response.status_code == 302  # post/redirect/get: a reload makes no second key
    response = client.get(response["Location"])
    body = response.content.decode()
    key = APIKey.objects.get(name="backend")
    secret = response.context["created"]["secret"]
    assert secret.startswith(key.display_prefix) and secret in body
    assert key.matches(secret)
    assert "not shown again" in body

    again = client.get("/api-keys/").content.decode()
    assert secret not in again
    assert key.display_prefix in again


def test_bad_input_keeps_what_was_typed_and_says_what_to_fix(console, organization):
    client = console(organization, Role.DEVELOPER)
    response = client.post(
        "/api-keys/",
        {"name": "ops", "scopes": ["management"], "role": "owner", "rpm_limit": "0"},
    )
    assert response.status_code == 400
    form = response.context["form"]
    assert form.errors["rpm_limit"]
    assert 'value="ops"' in response.content.decode()
    assert not APIKey.objects.filter(name="ops").exists()

    # A rule of the service (a developer cannot grant owner) shows on the form.
    response = client.post("/api-keys/", {"name": "ops", "scopes": ["management"], "role": "owner"})
    assert response.status_code == 400
    assert "cannot grant" in response.context["form"].non_field_errors()[0]
    assert "cannot grant" in response.content.decode()
    assert not APIKey.objects.filter(name="ops").exists()

    response = client.post("/api-keys/", {"name": "ops", "role": "developer"})
    assert response.context["form"].errors["scopes"] == ["Choose at least one scope."]

    response = client.post(
        "/api-keys/",
        {"name": "ops", "scopes": ["inference"], "role": "developer", "expires_at": "2001-01-01"},
    )
    assert "future" in response.context["form"].errors["expires_at"][0]


def test_revoking_a_key(console, organization):
    client = console(organization, Role.ADMIN)
    key, _ = api_key_create(actor=Actor.system(organization), name="old")
    response = client.post(f"/api-keys/{key.pk}/revoke", follow=True)
    assert "Revoked old" in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert "revoked" in response.content.decode()


def test_another_organizations_key_is_a_404(console, organization, other_organization):
    key, _ = api_key_create(actor=Actor.system(other_organization), name="theirs")
    response = console(organization, Role.OWNER).post(f"/api-keys/{key.pk}/revoke")
    assert response.status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


@pytest.mark.parametrize("role", [Role.VIEWER, Role.BILLING])
def test_roles_without_key_permissions_cannot_see_or_make_keys(console, organization, role):
    client = console(organization, role)
    key, _ = api_key_create(actor=Actor.system(organization), name="k")
    assert client.get("/api-keys/").status_code == 403
    assert client.post("/api-keys/", {"name": "x", "scopes": ["inference"]}).status_code == 403
    assert client.post(f"/api-keys/{key.pk}/revoke").status_code == 403
    assert 'href="/api-keys/"' not in client.get("/").content.decode()
    assert APIKey.objects.filter(organization=organization).count() == 1


def test_the_key_list_runs_a_constant_number_of_queries(console, organization):
    client = console(organization, Role.OWNER)
    actor = Actor.system(organization)

    def count():
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/api-keys/").status_code == 200
        return len(queries)

    api_key_create(actor=actor, name="first")
    few = count()
    for i in range(40):
        api_key_create(actor=actor, name=f"k{i}")
    assert count() == few
