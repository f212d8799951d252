from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.key_use import recorder as key_use
from accounts.models import APIKey, AuditLogEntry
from accounts.roles import Role
from accounts.signals import api_key_revoked

pytestmark = pytest.mark.django_db


def bearer(secret):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_create_returns_the_secret_once_and_stores_only_its_hash(api, organization):
    response = api.post(
        "/api/v1/api-keys", {"name": "backend", "scopes": ["inference"]}, format="json"
    )
    assert response.status_code == 201, response.json()
    secret = response.json()["key"]
    assert secret.startswith("sk-") and len(secret) == 55
    key = APIKey.objects.get(pk=response.json()["id"])
    assert key.secret_hash == APIKey.hash_secret(secret)
    assert secret not in str(APIKey.objects.filter(pk=key.pk).values().get())
    assert response.json()["prefix"] == secret[:15]

    listed = api.get("/api/v1/api-keys").json()["results"]
    assert all("key" not in item for item in listed)
    assert "key" not in api.get(f"/api/v1/api-keys/{key.pk}").json()
    assert AuditLogEntry.objects.filter(action="api_key.create", target_id=str(key.pk)).exists()


def test_the_new_key_works_against_the_api(api):
    secret = api.post(
        "/api/v1/api-keys",
        {"name": "ops", "scopes": ["management"], "role": "viewer"},
        format="json",
    ).json()["key"]
    response = bearer(secret).get("/api/v1/organizations/current")
    assert response.status_code == 200


def test_revoked_key_is_refused_and_the_revocation_is_broadcast(
    api, make_api_key, organization, django_capture_on_commit_callbacks
):
    key, secret = make_api_key(organization)
    seen = []

    def on_revoked(sender, api_key_id, prefix, **kwargs):
        seen.append((api_key_id, prefix))

    api_key_revoked.connect(on_revoked)
    try:
        assert bearer(secret).get("/api/v1/organizations/current").status_code == 200
        with django_capture_on_commit_callbacks(execute=True):
            response = api.delete(f"/api/v1/api-keys/{key.pk}")
        assert response.status_code == 204
    finally:
        api_key_revoked.disconnect(on_revoked)
    refused = bearer(secret).get("/api/v1/organizations/current")
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert seen == [(key.pk, key.prefix)]
    # Revoking again changes nothing and sends nothing.
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/api-keys/{key.pk}").status_code == 204
    assert seen == [(key.pk, key.prefix)]
    assert AuditLogEntry.objects.filter(action="api_key.revoke").count() == 1


def test_expired_key_is_refused(make_api_key, organization):
    key, secret = make_api_key(organization)
    APIKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = bearer(secret).get("/api/v1/organizations/current")
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


@pytest.mark.parametrize(
    "header",
    ["Bearer sk-nope", "Bearer", "Bearer a b", "Bearer " + "sk-" + "x" * 52],
)
def test_bad_keys_get_401_with_www_authenticate(header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/organizations/current")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert response["WWW-Authenticate"] == 'Bearer realm="sirocco"'


def test_inference_only_key_cannot_use_the_management_api(make_api_key, organization):
    _key, secret = make_api_key(organization, scopes=["inference"])
    response = bearer(secret).get("/api/v1/organizations/current")
    assert response.status_code == 403
    assert "management" in response.json()["detail"]


def test_a_key_cannot_carry_more_rights_than_its_creator(key_client, organization):
    developer = key_client(organization, Role.DEVELOPER)
    response = developer.post("/api/v1/api-keys", {"name": "x", "role": "owner"}, format="json")
    assert response.status_code == 403
    assert APIKey.objects.filter(name="x").count() == 0


def test_limits_and_expiry_are_validated(api):
    past = (timezone.now() - timedelta(days=1)).isoformat()
    response = api.post("/api/v1/api-keys", {"name": "x", "expires_at": past}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "expires_at"
    response = api.post("/api/v1/api-keys", {"name": "x", "rpm_limit": 0}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "rpm_limit"
    response = api.post("/api/v1/api-keys", {"name": "x", "scopes": ["root"]}, format="json")
    assert response.status_code == 400
    assert APIKey.objects.filter(name="x").count() == 0


def test_last_used_is_recorded_off_the_request_path(make_api_key, organization):
    key_use.flush()  # uses noted by earlier tests (whose key ids may come again)
    key, secret = make_api_key(organization)
    assert key.last_used_at is None
    before = timezone.now()
    bearer(secret).get("/api/v1/organizations/current")
    key.refresh_from_db()
    assert key.last_used_at is None, "a read request writes nothing"
    assert key_use.flush() == 1  # what the recorder's thread does once a minute
    key.refresh_from_db()
    assert before <= key.last_used_at <= timezone.now()
    # Never moved back by an older use noted later (the gateway records uses too).
    key_use.note(key.pk, before - timedelta(hours=1))
    key_use.flush()
    key.refresh_from_db()
    assert key.last_used_at >= before
