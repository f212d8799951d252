"""Single sign-on settings through the REST API: owners write, owners and admins read, the
client secret is stored encrypted and never leaves (responses, audit log, logs, schema)."""

import json
import logging

import pytest
from django.test import override_settings

from accounts.models import AuditLogEntry, SingleSignOnConfiguration
from accounts.roles import Role
from controlplane import secrets_at_rest
from tests.conftest import IDP_CLIENT_ID, IDP_CLIENT_SECRET

pytestmark = pytest.mark.django_db
URL = "/api/v1/organizations/current/sso"


@pytest.fixture(autouse=True)
def _http_issuers(settings):
    settings.SSO_ALLOW_HTTP_ISSUERS = True  # the provider is on loopback, over http


def configuration(issuer, **fields):
    return {
        "issuer": issuer,
        "client_id": IDP_CLIENT_ID,
        "client_secret": IDP_CLIENT_SECRET,
        "allowed_email_domains": ["Acme.example", "eu.ACME.example"],
        **fields,
    }


def test_an_owner_configures_and_enables_it_and_the_secret_never_comes_back(
    organization, session_client, oidc_provider, caplog
):
    client, owner = session_client(organization, Role.OWNER)
    caplog.set_level(logging.DEBUG)
    created = client.put(URL, configuration(oidc_provider.issuer), format="json")
    assert created.status_code == 200, created.content
    body = created.json()
    assert body["enabled"] is False
    assert body["client_secret_set"] is True
    assert body["allowed_email_domains"] == ["acme.example", "eu.acme.example"]
    assert body["default_role"] == "viewer"
    assert body["redirect_uri"].endswith(f"/login/sso/{organization.slug}/callback")

    enabled = client.patch(URL, {"enabled": True, "default_role": "developer"}, format="json")
    assert enabled.status_code == 200, enabled.content
    assert enabled.json()["enabled"] is True
    read = client.get(URL)
    assert read.json()["default_role"] == "developer"

    stored = SingleSignOnConfiguration.objects.get(organization=organization)
    assert IDP_CLIENT_SECRET not in stored.client_secret_encrypted
    assert secrets_at_rest.decrypt(stored.client_secret_encrypted) == IDP_CLIENT_SECRET
    entries = AuditLogEntry.objects.filter(organization=organization, action__startswith="sso.")
    assert [e.action for e in entries.order_by("created_at", "id")] == ["sso.create", "sso.update"]
    assert entries.get(action="sso.create").changes["client_secret"] == "set"
    assert entries.get(action="sso.update").actor_label == owner.email
    everything = json.dumps(
        [created.json(), enabled.json(), read.json(), list(entries.values("changes"))]
    )
    assert IDP_CLIENT_SECRET not in everything
    assert IDP_CLIENT_SECRET not in caplog.text


def test_replacing_the_secret_is_audited_without_it(organization, session_client, oidc_provider):
    client, _owner = session_client(organization, Role.OWNER)
    client.put(URL, configuration(oidc_provider.issuer), format="json")
    response = client.patch(URL, {"client_secret": "a-new-secret-value"}, format="json")
    assert response.status_code == 200
    assert "a-new-secret-value" not in response.content.decode()
    entry = AuditLogEntry.objects.filter(action="sso.update").get()
    assert entry.changes == {"client_secret": "replaced"}
    stored = SingleSignOnConfiguration.objects.get(organization=organization)
    assert secrets_at_rest.decrypt(stored.client_secret_encrypted) == "a-new-secret-value"


def test_secrets_survive_a_key_rotation(organization, session_client, oidc_provider, settings):
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PROVIDER_CREDENTIAL_KEYS = [old]
    client, _owner = session_client(organization, Role.OWNER)
    client.put(URL, configuration(oidc_provider.issuer), format="json")
    settings.PROVIDER_CREDENTIAL_KEYS = [new, old]
    from django.core.management import call_command

    call_command("rotate_encrypted_secrets")
    settings.PROVIDER_CREDENTIAL_KEYS = [new]
    stored = SingleSignOnConfiguration.objects.get(organization=organization)
    assert secrets_at_rest.decrypt(stored.client_secret_encrypted) == IDP_CLIENT_SECRET


@pytest.mark.parametrize(
    ("role", "read", "write"),
    [
        (Role.OWNER, 200, 200),
        (Role.ADMIN, 200, 403),
        (Role.DEVELOPER, 403, 403),
        (Role.BILLING, 403, 403),
        (Role.VIEWER, 403, 403),
    ],
)
def test_only_owners_write_and_only_owners_and_admins_read(
    organization, session_client, key_client, oidc_provider, role, read, write
):
    owner_client, _owner = session_client(organization, Role.OWNER)
    owner_client.put(URL, configuration(oidc_provider.issuer), format="json")
    client, _user = session_client(organization, role)
    assert client.get(URL).status_code == read
    assert client.patch(URL, {"enabled": False}, format="json").status_code == write
    assert client.delete(URL).status_code == (204 if write == 200 else 403)
    if role != Role.OWNER:  # a management key with the role is held to the same table
        key = key_client(organization, role)
        assert key.get(URL).status_code == read


def test_another_tenants_configuration_is_invisible(
    organization, other_organization, session_client, oidc_provider
):
    owner_client, _owner = session_client(organization, Role.OWNER)
    owner_client.put(URL, configuration(oidc_provider.issuer), format="json")
    other, _other_owner = session_client(other_organization, Role.OWNER)
    assert other.get(URL).status_code == 404
    assert other.delete(URL).status_code == 404
    assert SingleSignOnConfiguration.objects.filter(organization=organization).exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"issuer": "ftp://idp.example"}, "issuer"),
        ({"issuer": "https://idp.example/?tenant=1"}, "issuer"),
        ({"allowed_email_domains": ["not a domain"]}, "allowed_email_domains"),
        ({"default_role": "owner"}, "default_role"),
        ({"password_login_enabled": False}, "password_login_enabled"),  # a password session
        ({"client_secret": ""}, "client_secret"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_400_with_the_field(
    organization, session_client, oidc_provider, change, field
):
    client, _owner = session_client(organization, Role.OWNER)
    response = client.put(URL, {**configuration(oidc_provider.issuer), **change}, format="json")
    assert response.status_code == 400, response.content
    assert field in json.dumps(response.json())
    assert IDP_CLIENT_SECRET not in response.content.decode()


def test_enabling_checks_the_providers_discovery(organization, session_client, oidc_provider):
    client, _owner = session_client(organization, Role.OWNER)
    wrong_issuer = oidc_provider.issuer.replace("/o", "/elsewhere")
    response = client.put(URL, configuration(wrong_issuer, enabled=True), format="json")
    assert response.status_code == 400
    assert "discovery document" in response.json()["detail"]
    assert not SingleSignOnConfiguration.objects.exists()
    # The issuer must be the one discovery names, to the character.
    response = client.put(
        URL, configuration(oidc_provider.issuer + "/", enabled=True), format="json"
    )
    assert response.status_code == 400
    assert "names the issuer" in response.json()["detail"]


def test_plain_http_issuers_are_refused_by_default(organization, session_client, settings):
    settings.SSO_ALLOW_HTTP_ISSUERS = False
    client, _owner = session_client(organization, Role.OWNER)
    response = client.put(URL, configuration("http://idp.example"), format="json")
    assert response.status_code == 400
    assert "https://" in response.json()["detail"]


def test_a_first_configuration_needs_the_secret(organization, session_client, oidc_provider):
    client, _owner = session_client(organization, Role.OWNER)
    body = configuration(oidc_provider.issuer)
    del body["client_secret"]
    response = client.put(URL, body, format="json")
    assert response.status_code == 400
    assert "client_secret" in json.dumps(response.json())


def test_remove_is_audited(organization, session_client, oidc_provider):
    client, _owner = session_client(organization, Role.OWNER)
    client.put(URL, configuration(oidc_provider.issuer), format="json")
    assert client.delete(URL).status_code == 204
    assert client.get(URL).status_code == 404
    assert AuditLogEntry.objects.filter(action="sso.remove", organization=organization).exists()


@pytest.mark.nodb
def test_the_schema_documents_the_secret_as_write_only():
    from drf_spectacular.generators import SchemaGenerator

    with override_settings(SSO_ALLOW_HTTP_ISSUERS=True):
        schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    assert "client_secret" not in components["SingleSignOn"]["properties"]
    assert components["SingleSignOnWriteRequest"]["properties"]["client_secret"]["writeOnly"]
    assert IDP_CLIENT_SECRET not in json.dumps(schema, default=str)
    operations = schema["paths"]["/api/v1/organizations/current/sso"]
    assert set(operations) >= {"get", "put", "patch", "delete"}


def test_a_key_may_switch_password_sign_in_off_but_only_with_sso_enabled(
    organization, key_client, oidc_provider
):
    owner_key = key_client(organization, Role.OWNER)
    body = configuration(oidc_provider.issuer, password_login_enabled=False)
    response = owner_key.put(URL, body, format="json")
    assert response.status_code == 400
    assert "only while single sign-on is enabled" in response.json()["detail"]
    response = owner_key.put(URL, {**body, "enabled": True}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["password_login_enabled"] is False


def test_without_encryption_keys_no_secret_is_stored(organization, session_client, settings):
    settings.PROVIDER_CREDENTIAL_KEYS = []
    client, _owner = session_client(organization, Role.OWNER)
    response = client.put(URL, configuration("https://idp.example"), format="json")
    assert response.status_code == 400
    assert "PROVIDER_CREDENTIAL_KEYS" in response.json()["detail"]
    assert not SingleSignOnConfiguration.objects.exists()
