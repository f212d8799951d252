"""The projects pages: list and create, one project's settings, allow-list, budget, members and
keys (server-rendered, through Django's client), cost attribution on the usage and invoice
pages; and the whole journey in a real headless Chromium, with screenshots."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.actors import Actor
from accounts.models import APIKey, AuditLogEntry, Project, ProjectMembership
from accounts.projects import project_create
from accounts.roles import Role
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.periods import period_containing
from metering.models import UsageTag
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory


@pytest.mark.django_db
def test_projects_pages_for_each_role(console, organization):
    search = project_create(actor=Actor.system(organization), name="search")
    for role in Role.values:
        client = console(organization, role)
        listing = client.get("/projects/")
        assert listing.status_code == 200, role
        assert "search" in listing.content.decode()
        creates = "Create a project" in listing.content.decode()
        assert creates == (role in (Role.OWNER, Role.ADMIN)), role
        page = client.get(f"/projects/{search.pk}/")
        assert page.status_code == 200, role
        html = page.content.decode()
        assert ("Save budget" in html) == (role in (Role.OWNER, Role.BILLING)), role
        assert ("Create a key in search" in html) == (
            role in (Role.OWNER, Role.ADMIN, Role.DEVELOPER)
        ), role
    theirs = Project.objects.get(organization=OrganizationFactory())
    assert console(organization).get(f"/projects/{theirs.pk}/").status_code == 404


@pytest.mark.django_db
def test_create_a_project_its_allow_list_budget_member_and_key(console, organization):
    owner = console(organization, Role.OWNER)
    response = owner.post(
        "/projects/",
        {"name": "search", "rpm_limit": "60", "allowed_models": "chat\nembed, chat"},
    )
    project = Project.objects.get(organization=organization, name="search")
    assert response.status_code == 302 and response["Location"] == f"/projects/{project.pk}/"
    assert (project.rpm_limit, project.allowed_models) == (60, ["chat", "embed"])
    bad = owner.post("/projects/", {"name": "search"})
    assert bad.status_code == 400 and "is taken" in bad.content.decode()

    assert (
        owner.post(f"/projects/{project.pk}/budget", {"monthly_budget": "12.50"}).status_code == 302
    )
    project.refresh_from_db()
    assert project.monthly_budget == Decimal("12.50")

    member = MembershipFactory(organization=organization, role=Role.VIEWER)
    owner.post(f"/projects/{project.pk}/members", {"email": member.user.email, "role": "developer"})
    project_member = ProjectMembership.objects.get(project=project)
    assert project_member.role == Role.DEVELOPER

    response = owner.post(
        f"/projects/{project.pk}/keys",
        {"name": "ci", "scopes": ["inference"], "role": "developer", "allowed_models": "chat"},
    )
    assert response.status_code == 302
    key = APIKey.objects.get(name="ci")
    assert (key.project_id, key.allowed_models) == (project.pk, ["chat"])
    shown = owner.get(f"/projects/{project.pk}/").content.decode()
    assert "not shown again" in shown and "sk-" in shown
    assert "not shown again" not in owner.get(f"/projects/{project.pk}/").content.decode()

    owner.post(f"/projects/{project.pk}/members/{project_member.pk}", {"remove": "1"})
    assert not ProjectMembership.objects.filter(pk=project_member.pk).exists()
    assert set(
        AuditLogEntry.objects.filter(organization=organization).values_list("action", flat=True)
    ) >= {"project.create", "project.update", "project_member.add", "api_key.create"}


@pytest.mark.django_db
def test_a_project_role_lets_a_viewer_make_keys_there(console, organization):
    project = project_create(actor=Actor.system(organization), name="search")
    viewer = console(organization, Role.VIEWER)
    refused = viewer.post(
        f"/projects/{project.pk}/keys", {"name": "k", "scopes": ["inference"], "role": "viewer"}
    )
    assert refused.status_code == 403
    ProjectMembership.objects.create(project=project, user=viewer.user, role=Role.DEVELOPER)
    made = viewer.post(
        f"/projects/{project.pk}/keys", {"name": "k", "scopes": ["inference"], "role": "viewer"}
    )
    assert made.status_code == 302
    assert APIKey.objects.get(name="k").project == project


@pytest.mark.django_db
def test_usage_and_invoice_pages_attribute_cost(console, organization):
    version = ModelVersionFactory()
    TokenPriceFactory(model_version=version, effective_from=timezone.now() - timedelta(days=90))
    search = project_create(actor=Actor.system(organization), name="search")
    last_period = period_containing(period_containing(timezone.now()).start - timedelta(days=1))
    for when in (timezone.now(), last_period.start + timedelta(days=1)):
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            project_id=search.pk,
            end_user="alice",
            tags={"team": "ads"},
            finished_at=when,
        )
    UsageTag.objects.create(organization=organization, key="team", value="ads")
    usage_events_ingest()
    billing_period_close(period_start=last_period.start)
    owner = console(organization, Role.OWNER)
    html = owner.get("/usage/").content.decode()
    assert "By project" in html and "search" in html and "alice" in html
    tagged = owner.get("/usage/?by=tag:team").content.decode()
    assert "tag “team”" in tagged and "ads" in tagged
    invoice = organization.invoices.get()
    detail = owner.get(f"/invoices/{invoice.number}/").content.decode()
    assert "By project" in detail and "search" in detail


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_projects_in_chromium(page, live_server):
    organization = OrganizationFactory(name="Acme AI")
    user = UserFactory(email="owner@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    MembershipFactory(
        organization=organization, user=UserFactory(email="dev@acme.example"), role=Role.VIEWER
    )
    log_in(page, live_server, "owner@acme.example")

    page.get_by_role("link", name="Projects").click()
    page.get_by_role("heading", name="Projects", level=1).wait_for()
    page.get_by_label("Name").fill("search")
    page.get_by_label("Requests per minute").fill("120")
    page.get_by_label("Allowed models").fill("mixtral-prod\nmixtral-small")
    page.get_by_role("button", name="Create project").click()
    page.get_by_role("heading", name="search", level=1).wait_for()
    expect(page.get_by_text("Created the project search.")).to_be_visible()

    page.get_by_label("Monthly budget").fill("250")
    page.get_by_role("button", name="Save budget").click()
    expect(page.get_by_text("Saved the project's monthly budget.")).to_be_visible()

    page.locator("#project-member-email").fill("dev@acme.example")
    page.locator("#project-member-role").select_option("developer")
    page.get_by_role("button", name="Add to project").click()
    expect(page.get_by_text("Added dev@acme.example to the project.")).to_be_visible()

    page.locator("#project-key-name").fill("search backend")
    page.locator("#project-key-allowed_models").fill("mixtral-prod")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-secret")).to_contain_text("sk-")
    expect(page.get_by_role("cell", name="mixtral-prod", exact=True)).to_be_visible()
    screenshot(page, "project-detail")

    page.get_by_role("link", name="Projects").first.click()
    expect(page.get_by_role("link", name="search")).to_be_visible()
    expect(page.get_by_role("cell", name="mixtral-prod, mixtral-small")).to_be_visible()
    screenshot(page, "projects-list")
    project = Project.objects.get(name="search")
    assert (project.rpm_limit, project.monthly_budget) == (120, Decimal("250.00"))

    # Cost attribution on the usage page: by project, by end user, by a tag.
    version = ModelVersionFactory()
    TokenPriceFactory(model_version=version, effective_from=timezone.now() - timedelta(days=30))
    default = organization.projects.get(is_default=True)
    for owner, user_id, team, tokens in [
        (project, "alice", "ads", 4_000_000),
        (project, "bob", "ads", 1_000_000),
        (default, "carol", "core", 2_000_000),
    ]:
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            project_id=owner.pk,
            end_user=user_id,
            tags={"team": team},
            prompt_tokens=tokens,
        )
        UsageTag.objects.get_or_create(organization=organization, key="team", value=team)
    usage_events_ingest()
    page.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="By project").wait_for()
    expect(page.get_by_role("heading", name="By end user")).to_be_visible()
    page.get_by_role("link", name="Tag team").click()
    expect(page.get_by_role("heading", name="By tag “team”")).to_be_visible()
    screenshot(page, "usage-by-project-and-tag")
