"""Every console page, for every role: it renders (or is refused as the API would refuse it),
and loads nothing from outside the app."""

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.roles import ROLE_PERMISSIONS, Permission, Role
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.periods import period_containing
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)
from tests.deployments.factories import DeploymentEventFactory, DeploymentFactory, ReplicaFactory

pytestmark = pytest.mark.django_db

# An attribute or CSS reference that would make the browser fetch from another origin.
EXTERNAL = re.compile(
    r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//""",
    re.I,
)
# An inline script, an event handler attribute or a style attribute or element.
INLINE = re.compile(r"""<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+\s*=|\sstyle\s*=|<style\b""", re.I)
STATIC = Path(__file__).resolve().parents[2] / "console" / "static" / "console"


@pytest.fixture
def pages(organization):
    model = ModelFactory(slug="mixtral-tiny", moe=True)
    version = ModelVersionFactory(model=model, version="v1")
    TokenPriceFactory(model_version=version, effective_from=timezone.now() - timedelta(days=60))
    profile = HardwareProfileFactory(name="h100")
    DedicatedPriceFactory(model_version=version, hardware_profile=profile)
    deployment = DeploymentFactory(
        organization=organization, model_version=version, hardware_profile=profile, priced=False
    )
    ReplicaFactory(deployment=deployment)
    DeploymentEventFactory(deployment=deployment)
    last_period = period_containing(period_containing(timezone.now()).start - timedelta(days=1))
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        deployment_id=deployment.pk,
        finished_at=last_period.start + timedelta(days=1),
    )
    usage_events_ingest()
    billing_period_close(period_start=last_period.start)
    invoice = organization.invoices.get()
    return {
        "/": None,
        "/models/": None,
        f"/models/{model.slug}/": None,
        f"/models/{model.slug}/deploy": Permission.DEPLOYMENTS_WRITE,
        "/deployments/": Permission.DEPLOYMENTS_READ,
        f"/deployments/{deployment.pk}/": Permission.DEPLOYMENTS_READ,
        "/playground/": Permission.API_KEYS_WRITE,
        f"/deployments/{deployment.pk}/playground": Permission.API_KEYS_WRITE,
        "/usage/": Permission.USAGE_READ,
        "/invoices/": Permission.BILLING_READ,
        "/invoices/upcoming": Permission.BILLING_READ,
        f"/invoices/{invoice.number}/": Permission.BILLING_READ,
        "/api-keys/": Permission.API_KEYS_READ,
        "/settings/": Permission.ORGANIZATION_READ,
        "/settings/sso": Permission.SSO_READ,
    }


@pytest.mark.parametrize("role", Role.values)
def test_every_page_renders_for_the_roles_the_permission_table_allows(
    console, organization, pages, role
):
    client = console(organization, role)
    for path, permission in pages.items():
        response = client.get(path)
        allowed = permission is None or permission in ROLE_PERMISSIONS[role]
        assert response.status_code == (200 if allowed else 403), (role, path)
        body = response.content.decode()
        assert not EXTERNAL.search(body), (path, EXTERNAL.search(body).group(0))
        assert 'lang="en"' in body and 'id="main"' in body
        # The Content-Security-Policy runs no inline script or style (in Chromium:
        # test_browser_csp.py); catch one here, where it is cheap.
        assert not INLINE.search(body), (path, INLINE.search(body).group(0))
        assert "script-src 'self'" in response["Content-Security-Policy"]


def test_the_login_page_and_the_assets_load_nothing_from_elsewhere(client):
    for path in ("/login/", "/password-reset/"):
        body = client.get(path).content.decode()
        assert not EXTERNAL.search(body), path
    for path in STATIC.rglob("*"):
        if path.suffix in {".css", ".html", ".svg"}:
            assert not EXTERNAL.search(path.read_text()), path


@pytest.mark.nodb
def test_the_external_reference_check_catches_what_it_should():
    for html in [
        '<script src="https://cdn.example.com/htmx.js"></script>',
        "<link rel=stylesheet href=//fonts.example.com/a.css>",
        "<style>body{background:url('https://x.example.com/a.png')}</style>",
    ]:
        assert EXTERNAL.search(html), html
    assert not EXTERNAL.search('<a href="/models/">Models</a> <code>curl https://x/v1</code>')


@pytest.mark.nodb
def test_the_inline_code_check_catches_what_it_should():
    for html in [
        '<div style="color:red">',
        "<script>alert(1)</script>",
        '<a onclick="x()">',
        "<style>",
    ]:
        assert INLINE.search(html), html
    for html in ['<script src="/static/console/console.js" defer>', '<div class="onboard">']:
        assert not INLINE.search(html), html
