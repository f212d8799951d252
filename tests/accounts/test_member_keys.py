"""Keys are bound to their maker's membership: a demotion caps them, a removal (or a
deactivated or deleted account) revokes them, each audited and broadcast to the gateway.
The console's playground key dies with the session. (The whole attack against a running
gateway: tests/gateway/test_member_keys.py.)"""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import APIKey, AuditLogEntry, Membership
from accounts.roles import ROLE_PERMISSIONS, Role, role_cap
from accounts.signals import api_key_revoked
from tests.deployments.factories import DeploymentFactory
from tests.factories import MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("key_role", Role.values)
@pytest.mark.parametrize("member_role", Role.values)
def test_a_capped_role_never_holds_more_than_the_key_or_the_member(key_role, member_role):
    capped = role_cap(key_role, member_role)
    assert ROLE_PERMISSIONS[capped] <= ROLE_PERMISSIONS[key_role] & ROLE_PERMISSIONS[member_role]
    if ROLE_PERMISSIONS[key_role] <= ROLE_PERMISSIONS[member_role]:
        assert capped == key_role  # nothing to take away


def test_caps_are_what_both_allow():
    assert role_cap(Role.ADMIN, Role.VIEWER) == Role.VIEWER
    assert role_cap(Role.ADMIN, Role.DEVELOPER) == Role.DEVELOPER
    assert role_cap(Role.OWNER, Role.BILLING) == Role.BILLING
    assert role_cap(Role.DEVELOPER, Role.BILLING) == Role.VIEWER  # not billing rights it never had


def session(membership):
    client = APIClient()
    client.force_login(membership.user)
    return client


def bearer(secret):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def recorded_revocations():
    seen = []

    def on_revoked(sender, api_key_id, **kwargs):
        seen.append(api_key_id)

    api_key_revoked.connect(on_revoked)
    yield seen
    api_key_revoked.disconnect(on_revoked)


def test_demotion_caps_and_removal_revokes_with_audit_and_broadcast(
    organization, django_capture_on_commit_callbacks, recorded_revocations
):
    owner = MembershipFactory(organization=organization, role=Role.OWNER)
    admin = MembershipFactory(organization=organization, role=Role.ADMIN)
    created = session(admin).post(
        "/api/v1/api-keys",
        {"name": "ops", "scopes": ["management", "inference"], "role": "admin"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    key = APIKey.objects.get(pk=created.json()["id"])
    # A key made with that key stands on the admin's authority too.
    child = bearer(created.json()["key"]).post(
        "/api/v1/api-keys",
        {"name": "child", "scopes": ["management"], "role": "developer"},
        format="json",
    )
    assert child.status_code == 201, child.json()
    child_key = APIKey.objects.get(pk=child.json()["id"])
    assert child_key.created_by == admin.user
    other_key = session(owner).post(
        "/api/v1/api-keys", {"name": "owner's", "role": "admin"}, format="json"
    )
    assert other_key.status_code == 201

    demoted = session(owner).patch(f"/api/v1/members/{admin.pk}", {"role": "viewer"}, format="json")
    assert demoted.status_code == 200
    key.refresh_from_db()
    child_key.refresh_from_db()
    assert (key.role, key.revoked_at, child_key.role) == (Role.VIEWER, None, Role.VIEWER)
    caps = AuditLogEntry.objects.filter(action="api_key.cap")
    assert {(c.target_id, tuple(c.changes["role"]), c.actor_label) for c in caps} == {
        (str(child_key.pk), ("developer", "viewer"), owner.user.email),
        (str(key.pk), ("admin", "viewer"), owner.user.email),
    }
    assert APIKey.objects.get(pk=other_key.json()["id"]).role == Role.ADMIN  # not theirs

    with django_capture_on_commit_callbacks(execute=True):
        removed = session(owner).delete(f"/api/v1/members/{admin.pk}")
    assert removed.status_code == 204
    assert sorted(recorded_revocations) == sorted([key.pk, child_key.pk])
    assert not APIKey.objects.filter(created_by=admin.user, revoked_at__isnull=True).exists()
    revokes = AuditLogEntry.objects.filter(action="api_key.revoke")
    assert {r.changes["reason"] for r in revokes} == {"member.remove"}
    assert APIKey.objects.get(pk=other_key.json()["id"]).revoked_at is None


def test_removal_in_the_console_revokes_too(organization, recorded_revocations):
    owner = MembershipFactory(organization=organization, role=Role.OWNER)
    developer = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    key_id = session(developer).post("/api/v1/api-keys", {"name": "k"}, format="json").json()["id"]
    client = Client()
    client.force_login(owner.user)
    response = client.post(f"/settings/members/{developer.pk}/remove")
    assert response.status_code in (200, 302)
    assert not Membership.objects.filter(pk=developer.pk).exists()
    assert APIKey.objects.get(pk=key_id).revoked_at is not None


def test_the_admin_binds_keys_as_the_services_do(organization, admin_client_for):
    member = MembershipFactory(organization=organization, role=Role.ADMIN)
    key_id = (
        session(member)
        .post("/api/v1/api-keys", {"name": "k", "role": "admin"}, format="json")
        .json()["id"]
    )
    operator = admin_client_for()
    prefix = "memberships"
    form = {
        "slug": organization.slug,
        "name": organization.name,
        "billing_email": organization.billing_email,
        "currency": organization.currency,
        "status": organization.status,
        "max_gpus": organization.max_gpus,
        "max_deployments": organization.max_deployments,
        "monthly_spend_limit": "",
        f"{prefix}-TOTAL_FORMS": "1",
        f"{prefix}-INITIAL_FORMS": "1",
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
        f"{prefix}-0-id": str(member.pk),
        f"{prefix}-0-organization": str(organization.pk),
        f"{prefix}-0-user": str(member.user.pk),
        f"{prefix}-0-role": "developer",
    }
    url = f"/admin/accounts/organization/{organization.pk}/change/"
    response = operator.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert APIKey.objects.get(pk=key_id).role == Role.DEVELOPER
    # Giving the row to someone else is the old person leaving.
    stranger = UserFactory()
    response = operator.post(url, {**form, f"{prefix}-0-user": str(stranger.pk)})
    assert response.status_code == 302
    assert APIKey.objects.get(pk=key_id).revoked_at is not None

    member = Membership.objects.get(pk=member.pk)
    key_id = session(member).post("/api/v1/api-keys", {"name": "k2"}, format="json").json()["id"]
    form[f"{prefix}-0-user"] = str(stranger.pk)
    response = operator.post(url, {**form, f"{prefix}-0-DELETE": "on"})
    assert response.status_code == 302
    assert APIKey.objects.get(pk=key_id).revoked_at is not None


def test_a_deactivated_account_loses_its_keys(organization, admin_client_for):
    member = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    key_id = session(member).post("/api/v1/api-keys", {"name": "k"}, format="json").json()["id"]
    user = member.user
    operator = admin_client_for()
    response = operator.post(
        f"/admin/accounts/user/{user.pk}/change/",
        {"email": user.email, "full_name": user.full_name, "is_staff": "", "groups": []},
    )  # is_active unticked
    assert response.status_code == 302, response.content.decode()[:2000]
    user.refresh_from_db()
    assert not user.is_active
    assert APIKey.objects.get(pk=key_id).revoked_at is not None
    entry = AuditLogEntry.objects.get(action="api_key.revoke", target_id=str(key_id))
    assert entry.changes == {"reason": "user.deactivate"}
    assert entry.organization == organization


def test_a_deleted_account_loses_its_keys(organization, admin_client_for):
    member = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    key_id = session(member).post("/api/v1/api-keys", {"name": "k"}, format="json").json()["id"]
    operator = admin_client_for()
    response = operator.post(f"/admin/accounts/user/{member.user.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    key = APIKey.objects.get(pk=key_id)
    assert key.revoked_at is not None and key.created_by is None


@pytest.fixture
def admin_client_for(db):
    def make():
        operator = UserFactory(is_staff=True, is_superuser=True)
        client = Client()
        client.force_login(operator)
        return client

    return make


def test_the_playground_key_dies_at_logout(
    organization, recorded_revocations, django_capture_on_commit_callbacks
):
    deployment = DeploymentFactory(organization=organization, name="chat")
    member = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    client = Client()
    client.force_login(member.user)
    assert client.get(f"/deployments/{deployment.pk}/playground").status_code == 200
    key = APIKey.objects.get(organization=organization, created_by=member.user)
    assert key.revoked_at is None
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/logout/")
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert recorded_revocations == [key.pk]
    entry = AuditLogEntry.objects.get(action="api_key.revoke", target_id=str(key.pk))
    assert (entry.actor_label, entry.changes) == (member.user.email, {"reason": "session.logout"})


def test_the_playground_key_never_outlives_the_session(organization, settings):
    settings.SESSION_COOKIE_AGE = 600
    deployment = DeploymentFactory(organization=organization, name="chat")
    member = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    client = Client()
    client.force_login(member.user)
    client.get(f"/deployments/{deployment.pk}/playground")
    key = APIKey.objects.get(organization=organization, created_by=member.user)
    assert (key.expires_at - key.created_at).total_seconds() <= 600 + 1


def test_a_replaced_playground_key_is_revoked(organization, other_organization):
    member = MembershipFactory(organization=organization, role=Role.DEVELOPER)
    MembershipFactory(organization=other_organization, user=member.user, role=Role.DEVELOPER)
    ours = DeploymentFactory(organization=organization, name="chat")
    theirs = DeploymentFactory(organization=other_organization, name="chat")
    client = Client()
    client.force_login(member.user)
    client.post("/organization/switch", {"organization": organization.pk})
    client.get(f"/deployments/{ours.pk}/playground")
    first = APIKey.objects.get(organization=organization)
    client.post("/organization/switch", {"organization": other_organization.pk})
    client.get(f"/deployments/{theirs.pk}/playground")
    first.refresh_from_db()
    assert first.revoked_at is not None
    assert APIKey.objects.get(organization=other_organization).revoked_at is None
