"""The deployment page's fallbacks and circuit states, in a real headless Chromium: the form sets
the fallbacks through the deployments service (audited), a refused target keeps what was typed
with the reason, and circuits reported by a gateway show per upstream without endpoints."""

from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect

from accounts.models import AuditLogEntry
from accounts.roles import Role
from deployments.models import Fallback
from deployments.services import upstream_circuit_report
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_deployment_page_sets_fallbacks_and_shows_circuits(page, live_server):
    organization = OrganizationFactory(name="Acme AI")
    user = UserFactory(email="owner@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    own = DeploymentFactory(organization=organization, name="mixtral-own")
    replica = ReplicaFactory(deployment=own, name="mixtral-own-0", endpoint="http://10.1.2.3:8000")
    DeploymentFactory(organization=organization, name="spare")
    DeploymentFactory(organization=OrganizationFactory(), name="theirs")
    upstream_circuit_report(
        deployment_id=own.pk,
        upstream=replica.endpoint,
        source="gateway:gw-0:17",
        state="open",
        failures=5,
        changed_at=datetime.now(UTC),
    )

    log_in(page, live_server, user.email)
    page.goto(f"{live_server.url}/deployments/{own.pk}/")
    section = page.locator(
        "section", has=page.get_by_role("heading", name="Fallbacks and circuits")
    )
    expect(section).to_contain_text("No fallbacks")
    expect(page.locator("#circuits")).to_contain_text("replica mixtral-own-0")
    expect(page.locator("#circuits")).to_contain_text("Open")
    expect(page.locator("body")).not_to_contain_text("10.1.2.3")  # endpoints are ours

    field = page.get_by_label("Fallbacks, in order")
    field.fill("spare, theirs")
    page.get_by_role("button", name="Save fallbacks").click()
    # Another organization's deployment is unknown, as a name nobody has.
    expect(page.locator("body")).to_contain_text("no deployment named 'theirs'")
    expect(page.get_by_label("Fallbacks, in order")).to_have_value("spare, theirs")
    assert not Fallback.objects.exists()

    page.get_by_label("Fallbacks, in order").fill("spare")
    page.get_by_role("button", name="Save fallbacks").click()
    expect(page.locator("#fallbacks")).to_contain_text("spare")
    assert list(Fallback.objects.values_list("target__name", flat=True)) == ["spare"]
    assert AuditLogEntry.objects.filter(action="deployment.update").exists()
    screenshot(page, "deployment-fallbacks-and-circuits")
