"""The publisher's console pages in Chromium: its listings with the review status and comments
of every proposed change, its statements (PDF and CSV links, payout status), and the analytics
of its models — customers counted, named only where they agreed in the terms. Screenshots land
in tests/artifacts/console/publisher-*.png."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from accounts.actors import Actor
from accounts.roles import Role
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.periods import period_containing
from billing.statements import revenue_share_set
from catalog.models import TermsOfUse
from catalog.permissions import operator_system_actor
from catalog.publishers import (
    listing_change_approve,
    listing_change_create,
    listing_change_request_changes,
    listing_change_submit,
    listing_create,
    publisher_create,
)
from catalog.terms import terms_accept
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

CARD = {
    "display_name": "Acme Chat",
    "hosting": "self_hosted",
    "description": "Acme's chat model.",
    "tasks": ["chat"],
    "languages": ["en"],
    "license": "Apache-2.0",
    "context_length": 4096,
    "architecture": "dense",
    "total_parameters": 100_000_000,
    "active_parameters": 100_000_000,
}


def publisher_with_history():
    """Acme AI: an approved card, a price waiting for review, a card edit sent back; usage of
    two customers last period (closed: a statement) and this one, one of them named."""
    operator = operator_system_actor()
    acme = OrganizationFactory(slug="acme", name="Acme AI")
    member = Actor(organization=acme, role=Role.OWNER)
    publisher = publisher_create(actor=operator, organization=acme, display_name="Acme AI")
    listing = listing_create(actor=member, publisher=publisher, slug="acme-chat")
    card = listing_change_create(actor=member, listing=listing, kind="card", payload=CARD)
    listing_change_submit(actor=member, change=card)
    listing_change_approve(actor=operator, change=card)
    listing.refresh_from_db()
    version = ModelVersionFactory(model=listing.model, version="1.0")
    now = timezone.now()
    last = period_containing(period_containing(now).start - timedelta(days=1))
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("2"),
        output_per_million=Decimal("6"),
        effective_from=last.start - timedelta(days=1),
    )
    price = listing_change_create(
        actor=member,
        listing=listing,
        kind="price",
        payload={"version": "1.0", "input_per_million": "1.5", "output_per_million": "5"},
    )
    listing_change_submit(actor=member, change=price)
    edit = listing_change_create(
        actor=member, listing=listing, kind="card", payload={**CARD, "description": "Better."}
    )
    listing_change_submit(actor=member, change=edit)
    listing_change_request_changes(
        actor=operator, change=edit, comment="Say which benchmarks it was evaluated on."
    )
    revenue_share_set(
        actor=operator, listing=listing, percent=Decimal("30"), effective_from=last.start
    )
    terms = TermsOfUse.objects.create(
        model_version=version,
        version="1",
        title="Acme terms",
        body="Be kind.",
        customers_named=True,
        effective_from=last.start,
    )
    named, quiet = OrganizationFactory(slug="named-co"), OrganizationFactory(slug="quiet-co")
    terms_accept(actor=Actor.system(named), version=version, terms_version=terms.version)
    for organization, tokens in ((named, 3_000_000), (quiet, 1_000_000)):
        for when in (last.start + timedelta(days=2), now - timedelta(hours=1)):
            UsageEventFactory(
                organization=organization,
                model_version_id=version.pk,
                prompt_tokens=tokens,
                completion_tokens=tokens // 3,
                finished_at=when,
            )
    usage_events_ingest()
    billing_period_close(period_start=last.start)
    return acme, publisher


@pytest.mark.django_db
def test_only_a_publisher_sees_the_publisher_pages(console):
    acme, _publisher = publisher_with_history()
    client = console(acme, Role.OWNER)
    listings = client.get("/publisher/").content.decode()
    assert "Waiting for review" in listings and "Changes requested" in listings
    assert "Say which benchmarks" in listings
    analytics = client.get("/publisher/analytics/?days=90").content.decode()
    assert "named-co" in analytics and "quiet-co" not in analytics
    statements = client.get("/publisher/statements/").content.decode()
    assert "SIR-PS-" in statements and "Payout waiting" in statements
    # A developer of the publisher sees its listings, not its money.
    developer = console(acme, Role.DEVELOPER)
    assert developer.get("/publisher/").status_code == 200
    assert developer.get("/publisher/statements/").status_code == 403
    # Another organization has no publisher pages, nor the menu item.
    other = console(OrganizationFactory(), Role.OWNER)
    assert other.get("/publisher/").status_code == 404
    assert 'href="/publisher/"' not in other.get("/").content.decode()
    assert 'href="/publisher/"' in client.get("/").content.decode()


@pytest.mark.django_db
def test_publisher_analytics_over_rest_names_only_consenting_customers(key_client):
    acme, _publisher = publisher_with_history()
    report = key_client(acme, Role.BILLING).get("/api/v1/publishers/acme/analytics?days=400")
    body = report.json()
    assert body["customers"] == 2 and body["named_customers"] == ["named-co"]
    [model] = body["models"]
    assert model["model"] == "acme-chat" and model["customers"] == 2
    assert model["input_tokens"] == 8_000_000 and model["requests"] == 4
    assert "quiet-co" not in report.content.decode()
    assert (
        key_client(acme, Role.BILLING).get("/api/v1/publishers/acme/analytics?days=0").status_code
        == 400
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_publisher_pages_in_chromium(page, live_server):
    acme, _publisher = publisher_with_history()
    user = UserFactory(email="owner@acme.example")
    MembershipFactory(organization=acme, user=user, role=Role.OWNER)
    log_in(page, live_server, "owner@acme.example")

    page.get_by_role("link", name="Publisher").click()
    page.wait_for_url(f"{live_server.url}/publisher/")
    statuses = page.get_by_test_id("change-status").all_inner_texts()
    assert sorted(statuses) == ["Approved", "Changes requested", "Waiting for review"]
    screenshot(page, "publisher-listings")

    page.get_by_role("link", name="Statements").click()
    assert page.get_by_test_id("payout-status").inner_text() == "Payout waiting"
    href = page.get_by_role("link", name="PDF").get_attribute("href")
    pdf = page.request.get(f"{live_server.url}{href}")
    assert pdf.ok and pdf.body().startswith(b"%PDF")
    screenshot(page, "publisher-statements")

    page.get_by_role("link", name="Analytics").click()
    page.get_by_role("link", name="90 days").click()
    assert page.get_by_test_id("customers").inner_text() == "2"
    assert "named-co" in page.content() and "quiet-co" not in page.content()
    screenshot(page, "publisher-analytics")
    assert Client().get("/publisher/").status_code == 302  # logged out: to the login page
