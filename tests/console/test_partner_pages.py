"""Partner-hosted models in the console: the "hosted by" badge, no hardware section, the enable
flow that shows the publisher's terms and records their acceptance, and (in Chromium, against
the console and gateway in one server and the fake Mistral API process) the playground."""

import re

import pytest
from playwright.sync_api import expect

from accounts.roles import Role
from catalog.models import TermsAcceptance
from deployments.models import Deployment
from tests.console.conftest import screenshot, serve_console_and_gateway
from tests.console.test_browser_foundation import log_in
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.partner import make_partner_model, start_fake_provider


def test_partner_pages_and_the_enable_flow(console, organization, db):
    make_partner_model("http://127.0.0.1:9/v1")
    client = console(organization)

    listing = client.get("/models/").content.decode()
    assert "hosted by Mistral AI" in listing

    page = client.get("/models/mistral-large/").content.decode()
    assert "hosted by Mistral AI" in page
    assert "Hardware for" not in page and "Enable 24.11" in page
    assert client.get("/models/mistral-large/deploy")["Location"] == "/models/mistral-large/enable"

    form = client.get("/models/mistral-large/enable").content.decode()
    assert "Be nice." in form and "version 1" in form
    refused = client.post(
        "/models/mistral-large/enable", {"name": "large", "terms_version": "1", "version": "24.11"}
    )
    assert refused.status_code == 400
    assert "Accept the terms" in refused.content.decode()
    assert not TermsAcceptance.objects.exists()

    enabled = client.post(
        "/models/mistral-large/enable",
        {"name": "large", "terms_version": "1", "version": "24.11", "accept": "on"},
    )
    assert enabled.status_code == 302, enabled.content.decode()[:2000]
    acceptance = TermsAcceptance.objects.get(organization=organization)
    assert acceptance.accepted_by == client.user and acceptance.terms.version == "1"
    deployment = Deployment.objects.get(organization=organization, name="large")
    assert enabled["Location"] == f"/deployments/{deployment.pk}/"
    detail = client.get(enabled["Location"]).content.decode()
    assert "hosted by Mistral AI" in detail and "Mistral AI's API" in detail
    # A viewer may read the model but not enable it.
    viewer = console(organization, Role.VIEWER)
    assert viewer.get("/models/mistral-large/").status_code == 200
    assert viewer.get("/models/mistral-large/enable").status_code == 403


@pytest.fixture
def platform_server(tmp_path, transactional_db):
    """The console and the gateway in one server, as the web process runs them."""
    server = serve_console_and_gateway(tmp_path, route_cache_seconds=0.2)
    yield server
    server.stop()


@pytest.fixture
def fake_provider(tmp_path):
    provider = start_fake_provider(tmp_path / "provider.log")
    yield provider
    provider.stop()


@pytest.mark.slow
def test_enable_and_chat_in_the_playground_in_chromium(
    page, platform_server, fake_provider, settings
):
    settings.SIROCCO_PUBLIC_URL = platform_server.url
    make_partner_model(fake_provider.base_url)
    organization = OrganizationFactory(name="Acme AI")
    user = UserFactory(email="owner@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    log_in(page, platform_server, user.email)

    page.goto(f"{platform_server.url}/models/")
    expect(page.locator(".badge.partner").first).to_have_text("hosted by Mistral AI")
    screenshot(page, "partner-1-models")
    page.get_by_role("link", name="Mistral Large").first.click()
    expect(page.get_by_role("heading", name="Hosted by Mistral AI")).to_be_visible()
    assert page.get_by_role("heading", name=re.compile("^Hardware")).count() == 0
    screenshot(page, "partner-2-model")

    page.get_by_role("link", name="Enable 24.11").click()
    expect(page.get_by_role("heading", name=re.compile("^Terms"))).to_be_visible()
    page.get_by_label("Name").fill("large")
    page.get_by_label(re.compile("I accept these terms")).check()
    screenshot(page, "partner-3-enable")
    page.get_by_role("button", name="Accept and enable").click()
    page.wait_for_url(re.compile(r"/deployments/[0-9a-f-]{36}/$"))
    screenshot(page, "partner-4-deployment")

    page.get_by_role("link", name="Open playground").click()
    page.get_by_label("Message").fill("Say hello in French.")
    page.get_by_role("button", name="Send").click()
    page.locator("#chat-usage", has_text="completion tokens").wait_for(timeout=60_000)
    answer = page.locator(".msg.assistant .content").inner_text()
    assert answer.startswith("Bonjour"), answer
    assert page.locator(".msg.error").count() == 0
    screenshot(page, "partner-5-playground")
    assert any(r["authorized"] for r in fake_provider.received())
