"""A client generated from /api/schema/ with openapi-python-client (what an enterprise builds
its SDK with) works against the live server: it lists the catalog, creates a deployment and
reads usage, with every body parsed into the generated models (a field the schema gets wrong
fails here)."""

import importlib
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create
from deployments.models import Deployment
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.factories import OrganizationFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

GENERATOR = Path(sys.executable).parent / "openapi-python-client"


@pytest.fixture
def generated_client(live_server, tmp_path, monkeypatch):
    """The `sirocco_client` package, generated now from the live server's schema."""
    schema = tmp_path / "openapi.json"
    schema.write_bytes(httpx.get(f"{live_server.url}/api/schema/?format=json").content)
    config = tmp_path / "config.yaml"
    config.write_text("project_name_override: sirocco-client\npost_hooks: []\n")
    out = tmp_path / "sirocco_client"
    command = [GENERATOR, "generate", "--path", schema, "--config", config, "--meta", "none"]
    subprocess.run(
        [*command, "--output-path", out],
        check=True,
        capture_output=True,
        timeout=120,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("sirocco_client")
    for name in [n for n in sys.modules if n.startswith("sirocco_client")]:
        del sys.modules[name]


def test_a_generated_client_lists_models_deploys_and_reads_usage(
    live_server, generated_client, emulated_cluster
):
    organization = OrganizationFactory(slug="sdk")
    version = ModelVersionFactory(model=ModelFactory(slug="mistral-7b"))
    profile = HardwareProfileFactory(name="h100-80gb-x1")
    DedicatedPriceFactory(model_version=version, hardware_profile=profile, per_hour=Decimal(2))
    _key, secret = api_key_create(
        actor=Actor.system(organization),
        name="sdk",
        scopes=[APIKey.Scope.MANAGEMENT],
        role=Role.ADMIN,
    )

    client_module = importlib.import_module("sirocco_client.client")
    deployments_create = importlib.import_module(
        "sirocco_client.api.deployments.deployments_create"
    )
    models_list = importlib.import_module("sirocco_client.api.models.models_list")
    usage_retrieve = importlib.import_module("sirocco_client.api.usage.usage_retrieve")
    models = importlib.import_module("sirocco_client.models")
    client = client_module.AuthenticatedClient(
        base_url=live_server.url, token=secret, raise_on_unexpected_status=True
    )

    page = models_list.sync(client=client)
    assert "mistral-7b" in [m.slug for m in page.results]

    created = deployments_create.sync(
        client=client,
        body=models.DeploymentCreateRequest(
            name="chat", model="mistral-7b", hardware_profile="h100-80gb-x1"
        ),
    )
    assert isinstance(created, models.Deployment), created
    assert (created.name, created.model, created.hardware_profile) == (
        "chat",
        "mistral-7b",
        "h100-80gb-x1",
    )
    assert Deployment.objects.get(pk=created.id).organization == organization

    taken = deployments_create.sync(
        client=client,
        body=models.DeploymentCreateRequest(
            name="chat", model="mistral-7b", hardware_profile="h100-80gb-x1"
        ),
    )
    assert isinstance(taken, models.Problem) and taken.status == 409, taken

    usage = usage_retrieve.sync(client=client, group_by=models.UsageRetrieveGroupBy.MODEL)
    assert isinstance(usage, models.UsageReport), usage
    assert (usage.group_by, usage.results) == (models.GroupByEnum.MODEL, [])
