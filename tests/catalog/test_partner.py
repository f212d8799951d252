"""Partner-hosted models in the catalog: provider connections (credentials encrypted, never
returned), the provider model and cost behind a version, terms of use and their acceptance,
and enabling a partner model as a serverless entry."""

import json
import logging

import pytest
from django.core.management import call_command
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from accounts.roles import Role
from catalog.models import ProviderConnection, TermsAcceptance
from catalog.providers import partner_target
from catalog.seeds import ensure_catalog_seeds
from deployments.models import Deployment
from deployments.reconciler import reconcile
from deployments.selectors import route_for
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

SECRET = "mistral-test-key-6f1c2a9e0b7d4c3a"  # a made-up credential
VERSION = "/api/v1/models/mistral-large/versions/24.11"


@pytest.fixture
def seeded(db):
    return ensure_catalog_seeds()


@pytest.fixture
def operator(db):
    client = APIClient()
    client.force_login(UserFactory(is_staff=True))
    return client


def connect(operator, **overrides):
    body = {
        "name": "mistral",
        "kind": "mistral",
        "base_url": "https://api.mistral.ai/v1",
        "credential": SECRET,
        "requests_per_minute": 60,
        "tokens_per_minute": 500000,
        **overrides,
    }
    return operator.post("/api/v1/provider-connections", body, format="json")


def test_the_seed_needs_a_provider_connection_until_an_operator_adds_one(seeded, api, operator):
    detail = api.get("/api/v1/models/mistral-large").json()
    assert detail["hosting"] == "partner" and detail["publisher"] == "Mistral AI"
    assert detail["context_length"] == 131072
    assert "huggingface.co/mistralai/Mistral-Large-Instruct-2411" in detail["description"]
    (version,) = detail["versions"]
    assert version["serving_runtime"] is None and version["hardware_profiles"] == []
    assert version["provider"] == {
        "kind": "mistral",
        "provider_model_id": "mistral-large-2411",
        "status": "needs_connection",
    }
    assert version["terms"]["version"] == "2024-11"
    assert version["token_price"]["input_per_million"] == "2.400000"

    created = connect(operator)
    assert created.status_code == 201, created.content
    mapped = operator.put(
        f"{VERSION}/provider",
        {"provider_model_id": "mistral-large-2411", "connection": "mistral"},
        format="json",
    )
    assert mapped.status_code == 200, mapped.content
    assert mapped.json()["status"] == "available"
    version = api.get("/api/v1/models/mistral-large").json()["versions"][0]
    assert version["provider"]["status"] == "available"
    target = partner_target(version_id=seeded[-1].versions.get().pk)
    assert target.credential.reveal() == SECRET and SECRET not in repr(target)


def test_credentials_are_encrypted_and_never_returned_or_logged(seeded, operator, caplog):
    caplog.set_level(logging.DEBUG)
    created = connect(operator)
    listed = operator.get("/api/v1/provider-connections")
    one = operator.get("/api/v1/provider-connections/mistral")
    patched = operator.patch(
        "/api/v1/provider-connections/mistral", {"credential": SECRET + "-2"}, format="json"
    )
    for response in (created, listed, one, patched):
        assert response.status_code in (200, 201), response.content
        assert SECRET not in response.content.decode()
    assert one.json()["has_credential"] is True
    stored = ProviderConnection.objects.get(name="mistral").credential_encrypted
    assert stored and SECRET not in stored
    audit = json.dumps(list(AuditLogEntry.objects.values("changes", "target_repr")))
    assert SECRET not in audit and "credential_set" in audit
    assert SECRET not in caplog.text
    schema = operator.get("/api/schema/?format=json").content.decode()
    connection = json.loads(schema)["components"]["schemas"]["ProviderConnection"]
    assert "credential" not in connection["properties"]
    write = json.loads(schema)["components"]["schemas"]["ProviderConnectionCreateRequest"]
    assert write["properties"]["credential"]["writeOnly"] is True


def test_connections_are_for_operators_only(seeded, api, operator):
    connect(operator)
    assert api.get("/api/v1/provider-connections").status_code == 403
    assert api.get("/api/v1/provider-connections/mistral").status_code == 403
    assert api.get(f"{VERSION}/provider-costs").status_code == 403
    assert connect(api, name="mine").status_code == 403


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"kind": "anthropic"}, "kind", "Unknown provider kind 'anthropic'"),
        ({"base_url": "ftp://api.mistral.ai/v1"}, "base_url", "http:// or https://"),
        ({"base_url": "file:///etc/passwd"}, "base_url", "http:// or https://"),
        ({"base_url": "https://user:pw@api.mistral.ai"}, "base_url", "user:password"),
        ({"tenant_share_percent": 0}, "tenant_share_percent", ""),
    ],
)
def test_bad_connections_are_clear_400s(seeded, operator, overrides, field, words):
    response = connect(operator, **overrides)
    assert response.status_code == 400, response.content
    assert response["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["errors"][0]["field"] == field
    assert words in body["detail"] + json.dumps(body["errors"])


def test_a_version_maps_only_to_a_connection_of_its_kind(seeded, operator):
    connect(operator, name="openai-like", kind="openai_compatible", base_url="http://x.test/v1")
    response = operator.put(
        f"{VERSION}/provider",
        {"provider_model_id": "mistral-large-2411", "connection": "openai-like"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "connection"
    assert "is served by a mistral API" in response.json()["detail"]
    unknown = operator.put(
        f"{VERSION}/provider", {"provider_model_id": "x", "kind": "grpc"}, format="json"
    )
    assert unknown.status_code == 400 and "Unknown provider kind" in unknown.json()["detail"]


def test_provider_cost_needs_a_currency(seeded, operator):
    missing = operator.post(
        f"{VERSION}/provider-costs",
        {"input_per_million": "2.5", "output_per_million": "7"},
        format="json",
    )
    assert missing.status_code == 400
    assert missing.json()["errors"][0]["field"] == "currency"
    created = operator.post(
        f"{VERSION}/provider-costs",
        {"currency": "EUR", "input_per_million": "2.5", "output_per_million": "7"},
        format="json",
    )
    assert created.status_code == 201, created.content
    costs = operator.get(f"{VERSION}/provider-costs").json()
    assert [c["currency"] for c in costs] == ["EUR", "USD"]


def test_terms_must_be_accepted_before_enabling_and_again_when_they_change(
    seeded, organization, key_client, operator
):
    client = key_client(organization, Role.ADMIN)
    enable = {"name": "large", "model": "mistral-large", "type": "serverless"}
    refused = client.post("/api/v1/deployments", enable, format="json")
    assert refused.status_code == 403, refused.content
    assert refused.json()["code"] == "terms_not_accepted"
    assert "terms/accept" in refused.json()["detail"]

    terms = client.get(f"{VERSION}/terms").json()
    assert terms[0]["version"] == "2024-11" and terms[0]["accepted"] is False
    stale = client.post(f"{VERSION}/terms/accept", {"version": "2023-01"}, format="json")
    assert stale.status_code == 409 and stale.json()["code"] == "terms_changed"
    viewer = key_client(organization, Role.VIEWER)
    assert (
        viewer.post(f"{VERSION}/terms/accept", {"version": "2024-11"}, format="json").status_code
        == 403
    )
    accepted = client.post(f"{VERSION}/terms/accept", {"version": "2024-11"}, format="json")
    assert accepted.status_code == 201, accepted.content
    assert accepted.json()["terms_version"] == "2024-11"
    acceptance = TermsAcceptance.objects.get(organization=organization)
    assert acceptance.accepted_by_label.startswith("api-key") and acceptance.accepted_at
    assert client.get(f"{VERSION}/terms").json()[0]["accepted"] is True

    created = client.post("/api/v1/deployments", enable, format="json")
    assert created.status_code == 201, created.content
    deployment = Deployment.objects.get(name="large")
    assert deployment.pool_id is None and deployment.type == "serverless"
    assert reconcile(deployment.pk) is None  # provisions nothing
    deployment.refresh_from_db()
    assert deployment.status == "ready"
    assert deployment.events.first().message == "Served by Mistral AI's API."
    route = route_for(organization_id=organization.pk, model="large")
    assert route.partner_publisher == "Mistral AI" and route.terms_pending is None
    assert route.provider is None  # no connection yet

    new_terms = operator.post(
        f"{VERSION}/terms",
        {"version": "2025-06", "title": "New terms", "body": "Read them again."},
        format="json",
    )
    assert new_terms.status_code == 201, new_terms.content
    route = route_for(organization_id=organization.pk, model="large")
    assert route.terms_pending == "2025-06"
    dedicated = client.post(
        "/api/v1/deployments",
        {"name": "large2", "model": "mistral-large", "hardware_profile": "h100-80gb-x2"},
        format="json",
    )
    assert dedicated.status_code == 400 and "serverless only" in dedicated.json()["detail"]


def test_rotation_re_encrypts_with_the_first_key(seeded, operator, settings):
    connect(operator)
    before = ProviderConnection.objects.get().credential_encrypted
    old, other = settings.PROVIDER_CREDENTIAL_KEYS
    new_first = [other, old]
    with override_settings(PROVIDER_CREDENTIAL_KEYS=new_first):
        call_command("rotate_encrypted_secrets")
        after = ProviderConnection.objects.get().credential_encrypted
        assert after != before
    # Only the new first key now: still decrypts.
    with override_settings(PROVIDER_CREDENTIAL_KEYS=[other]):
        version_id = seeded[-1].versions.get().pk
        operator.put(
            f"{VERSION}/provider",
            {"provider_model_id": "mistral-large-2411", "connection": "mistral"},
            format="json",
        )
        assert partner_target(version_id=version_id).credential.reveal() == SECRET
    # A key that never encrypted it: the connection is unusable, said in the log only.
    with override_settings(PROVIDER_CREDENTIAL_KEYS=["0" * 43 + "="]):
        assert partner_target(version_id=version_id) is None
