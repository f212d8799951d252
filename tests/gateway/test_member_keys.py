"""The attack from the security review, against the REST API and a running gateway: an admin
makes an admin-role management key, is demoted to viewer, then removed. The key loses the
admin's rights at the demotion and stops working everywhere at the removal."""

import time

import httpx
import pytest
from rest_framework.test import APIClient

from accounts.roles import Role
from tests.factories import MembershipFactory

pytestmark = pytest.mark.slow


def as_session(membership):
    client = APIClient()
    client.force_login(membership.user)
    return client


def test_a_removed_admins_key_can_no_longer_add_members_read_the_audit_log_or_call_v1(
    gateway, organization
):
    owner = MembershipFactory(organization=organization, role=Role.OWNER)
    admin = MembershipFactory(organization=organization, role=Role.ADMIN)
    created = as_session(admin).post(
        "/api/v1/api-keys",
        {"name": "mine", "scopes": ["management", "inference"], "role": "admin"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    secret = created.json()["key"]
    key = APIClient()
    key.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    v1 = {"authorization": f"Bearer {secret}"}

    def add_member(email):
        return key.post("/api/v1/members", {"email": email, "role": "admin"}, format="json")

    assert add_member("first@example.com").status_code == 201
    assert key.get("/api/v1/audit-log").status_code == 200
    assert httpx.get(gateway.v1 + "/models", headers=v1).status_code == 200  # now cached

    response = as_session(owner).patch(
        f"/api/v1/members/{admin.pk}", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 200
    assert add_member("second@example.com").status_code == 403
    assert key.get("/api/v1/audit-log").status_code == 403
    # Capped, not revoked: a viewer's key still does what a viewer may (read, and /v1).
    assert key.get("/api/v1/organizations/current").status_code == 200

    assert as_session(owner).delete(f"/api/v1/members/{admin.pk}").status_code == 204
    refused = add_member("third@example.com")
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert key.get("/api/v1/audit-log").status_code == 401
    # The gateway had the key cached: the revocation broadcast drops it at once.
    deadline = time.monotonic() + 1.0
    while True:
        response = httpx.get(gateway.v1 + "/models", headers=v1)
        if response.status_code == 401:
            assert "was revoked" in response.json()["error"]["message"]
            break
        assert time.monotonic() < deadline, "the removed admin's key still calls /v1"
        time.sleep(0.02)
