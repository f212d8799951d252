"""The OpenAPI document is the contract: schemathesis generates requests for every operation of
/api/schema/ and checks every answer against it (status codes, content types, bodies, headers,
negative data rejected, positive data accepted, auth enforced, …), against the live server with
a real API key of a tenant that has a catalog, a deployment, usage and an invoice to read.

A fixed seed and a small example budget per operation keep it deterministic and CI-sized
(docs/benchmarks.md has the timing); raise SCHEMATHESIS_MAX_EXAMPLES locally to dig deeper.
"""

import os
from datetime import timedelta
from decimal import Decimal

import pytest
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, seed, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.periods import period_containing
from deployments.models import Deployment
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import CpuProfileFactory
from tests.deployments.factories import (
    DeploymentEventFactory,
    DeploymentFactory,
    ReplicaFactory,
)
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "3"))


@pytest.fixture
def tenant(live_server, emulated_cluster):
    """An organization with something behind every endpoint, and an owner-role management key."""
    CpuProfileFactory(name="cpu-small")
    organization = OrganizationFactory(slug="contract")
    MembershipFactory(organization=organization, role=Role.OWNER)
    key, secret = api_key_create(
        actor=Actor.system(organization),
        name="contract",
        scopes=[APIKey.Scope.INFERENCE, APIKey.Scope.MANAGEMENT],
        role=Role.OWNER,
    )
    deployment = DeploymentFactory(organization=organization, status=Deployment.Status.READY)
    ReplicaFactory(deployment=deployment)
    DeploymentEventFactory(deployment=deployment)
    version = deployment.model_version
    version.token_prices.create(
        currency="USD",
        input_per_million=Decimal("0.5"),
        output_per_million=Decimal("1.5"),
        effective_from=timezone.now() - timedelta(days=400),
    )
    last = period_containing(period_containing(timezone.now()).start - timedelta(seconds=1))
    UsageEventFactory(
        organization=organization,
        api_key=key,
        model_version_id=version.pk,
        finished_at=last.start + timedelta(days=1),
    )
    UsageEventFactory(organization=organization, api_key=key, model_version_id=version.pk)
    usage_events_ingest()
    billing_period_close(period_start=last.start)
    return secret


def _served_schema() -> dict:
    """The document /api/schema/ serves (the schema is public and reads no database)."""
    from django.test import Client

    response = Client().get("/api/schema/", {"format": "json"}, HTTP_HOST="localhost")
    assert response.status_code == 200
    return response.json()


# Loaded at collection, so that each operation is its own test item. (schemathesis'
# from_fixture would load it from the live server, but does not run under pytest 9.)
# Rules a JSON schema cannot state, where a schema-valid request is still a 400 that names the
# field: references by name (an unknown model or profile), cross-field and time rules.
SEMANTIC_400 = {
    "POST /api/v1/api-keys": "expires_at must be in the future",
    "POST /api/v1/deployments": "model, version and hardware profile must exist and fit",
    "PATCH /api/v1/deployments/{id}": "version and hardware profile must exist and fit",
    "POST /api/v1/members": "the email must be a user's",
    "PUT /api/v1/organizations/current/sso": "enabling reads the issuer's discovery document",
    "PATCH /api/v1/organizations/current/sso": "a first configuration needs every setting",
    "GET /api/v1/usage": "end must not be before start; neither in the future",
    "GET /api/v1/models": "language is an ISO 639 code",
    "POST /api/v1/models": "the organization must exist",
    "POST /api/v1/models/{slug}/versions": "the runtime must exist; the weights must fit",
    "POST /api/v1/models/{slug}/versions/{version}/token-prices": "effective from now on",
    "POST /api/v1/models/{slug}/versions/{version}/dedicated-prices": "the profile must exist",
}
_accepts_400 = [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, "400"]
schema = schemathesis.openapi.from_dict(
    _served_schema(),
    config=SchemathesisConfig.from_dict(
        {
            "operations": [
                {
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": _accepts_400}},
                }
                for name in SEMANTIC_400
            ]
        }
    ),
)


@schema.parametrize()
@seed(20261206)
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_keeps_the_contract(case, live_server, tenant):
    case.call_and_validate(
        base_url=live_server.url, headers={"Authorization": f"Bearer {tenant}"}, timeout=30
    )
