"""Catalog, deploy form, deployment, usage and invoice pages in a real headless Chromium."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.roles import Role
from billing.ledger import usage_events_ingest
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.deployments.factories import (
    DeploymentEventFactory,
    DeploymentFactory,
    ReplicaFactory,
    ServerlessPoolFactory,
)
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CARD = """# Mixtral tiny

A **tiny** sparse mixture-of-experts model in Mixtral's format, for trying the platform.

| experts | per token |
|---|---|
| 8 | 2 |
"""


def catalog():
    mixtral = ModelFactory(
        slug="mixtral-tiny",
        display_name="Mixtral tiny",
        moe=True,
        languages=["en", "fr"],
        description=CARD,
        tags=["moe", "demo"],
    )
    version = ModelVersionFactory(model=mixtral, version="v1")
    TokenPriceFactory(model_version=version)
    h100 = HardwareProfileFactory(name="h100-80gb-x2", display_name="2 × H100 80GB", gpu_count=2)
    HardwareProfileFactory(name="l4-24gb", display_name="1 × L4 24GB", gpu_memory_gb=24)
    DedicatedPriceFactory(model_version=version, hardware_profile=h100, per_hour=Decimal("8"))
    ServerlessPoolFactory(model_version=version, priced=False)
    for name, publisher in [("Llama 3 8B", "Meta"), ("Qwen 2.5 7B", "Alibaba")]:
        other = ModelVersionFactory(model=ModelFactory(display_name=name, publisher=publisher))
        TokenPriceFactory(model_version=other, input_per_million=Decimal("0.2"))
    return version, h100


def test_catalog_model_deploy_form_deployment_usage_and_invoices(page, live_server):
    organization = OrganizationFactory(name="Acme AI")
    user = UserFactory(email="dev@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    version, h100 = catalog()
    log_in(page, live_server, "dev@acme.example")

    page.get_by_role("link", name="Models").click()
    page.get_by_label("Search").fill("mixtral")
    expect(page.locator(".model-card")).to_have_count(1)  # no eval() under the CSP
    assert "q=mixtral" in page.url  # htmx pushed the search into the address bar
    screenshot(page, "catalog-search")

    page.get_by_role("link", name="Mixtral tiny").click()
    page.get_by_role("heading", name="Mixtral tiny", level=1).wait_for()
    page.get_by_text("Why other hardware does not fit").click()
    screenshot(page, "model-page")

    page.get_by_role("link", name="Deploy v1").click()
    page.get_by_label("Expected requests a day").fill("400000")
    page.locator("#estimate", has_text="dedicated is cheaper").wait_for()
    screenshot(page, "deploy-form")

    deployment = DeploymentFactory(
        organization=organization,
        name="mixtral-tiny",
        model_version=version,
        hardware_profile=h100,
        status="provisioning",
        progress_phase="loading_weights",
        progress_percent=60,
        priced=False,
    )
    ReplicaFactory(deployment=deployment, name="mixtral-tiny-0", ready=False, phase="starting")
    DeploymentEventFactory(deployment=deployment, reason="Created", message="dev asked for it.")
    page.goto(f"{live_server.url}/deployments/{deployment.pk}/")
    assert page.get_by_role("progressbar").get_attribute("value") == "60"
    # The page polls: once the deployment is ready, it says so without a reload.
    type(deployment).objects.filter(pk=deployment.pk).update(
        status="ready", progress_phase="ready", progress_percent=100, ready_replicas=1
    )
    page.locator("#live .badge.ok", has_text="Ready").wait_for(timeout=10_000)
    screenshot(page, "deployment-ready")

    now = timezone.now()
    for minutes in range(1, 4):
        UsageEventFactory(
            organization=organization,
            deployment_id=deployment.pk,
            model_version_id=version.pk,
            model="mixtral-tiny",
            finished_at=now - timedelta(minutes=minutes),
        )
    usage_events_ingest(now=now)
    page.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="Tokens a day").wait_for()
    # Tokens and cost a day; by model, deployment, project, and end user or tag.
    assert page.locator("svg.chart").count() == 6
    screenshot(page, "usage")

    page.get_by_role("link", name="Invoices").click()
    page.get_by_role("link", name="Upcoming").click()
    assert re.search(r"input tokens", page.content())
    screenshot(page, "invoice-upcoming")
