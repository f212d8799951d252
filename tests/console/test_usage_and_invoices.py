import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.roles import Role
from billing.invoicing import billing_period_close
from billing.ledger import replica_usage_ingest, usage_events_ingest
from billing.periods import period_containing
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)
from tests.deployments.factories import (
    DeploymentFactory,
    ReplicaUsageFactory,
    ServerlessDeploymentFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def usage(organization):
    """Today: 3 serverless calls of 1000 + 500 tokens at $1 / $2 per 1M, and one hour of a
    dedicated replica at $4/h. Ingested by billing, as the worker does."""
    now = timezone.now()
    version = ModelVersionFactory(model=ModelFactory(display_name="Mixtral tiny"), version="v1")
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("1"),
        output_per_million=Decimal("2"),
        effective_from=now - timedelta(days=400),
    )
    chat = ServerlessDeploymentFactory(
        organization=organization,
        name="chat",
        pool__model_version=version,
        pool__priced=False,
    )
    for _ in range(3):
        UsageEventFactory(
            organization=organization,
            deployment_id=chat.pk,
            model_version_id=version.pk,
            model="chat",
            finished_at=now - timedelta(minutes=5),
        )
    profile = HardwareProfileFactory(name="h100")
    dedicated = DeploymentFactory(
        organization=organization,
        name="big",
        model_version=version,
        hardware_profile=profile,
        priced=False,
    )
    DedicatedPriceFactory(
        model_version=version,
        hardware_profile=profile,
        per_hour=Decimal("4"),
        effective_from=now - timedelta(days=400),
    )
    start = now.replace(microsecond=0) - timedelta(minutes=40)
    ReplicaUsageFactory(
        deployment=dedicated, started_at=start, ended_at=start + timedelta(minutes=30)
    )
    usage_events_ingest(now=now)
    replica_usage_ingest(now=now)
    return version


def test_the_usage_page_shows_tokens_and_cost_by_day_model_and_deployment(
    console, organization, usage
):
    response = console(organization, Role.VIEWER).get("/usage/")
    assert response.status_code == 200
    total = response.context["total"]
    assert (total.requests, total.input_tokens, total.output_tokens) == (3, 3000, 1500)
    # 3000 × $1/1M + 1500 × $2/1M = $0.006 of tokens; 30 minutes at $4/h = $2.
    assert total.amount == Decimal("2.006")
    assert total.gpu_seconds == 1800
    body = response.content.decode()
    assert 'Cost (30 days)</div><div class="stat">$2.01</div>' in body
    # Tokens, cost, by model, by deployment; and (since projects) by project and by end user.
    assert body.count('<svg class="chart"') == 6
    deployments = {row.label: row.amount for row in response.context["by_deployment"]}
    assert deployments == {"chat": Decimal("0.006"), "big": Decimal("2")}
    assert [row.label for row in response.context["by_model"]] == [f"{usage.model.slug}:v1"]


def test_the_csv_exports_are_the_usage_apis_in_the_same_session(console, organization, usage):
    client = console(organization, Role.VIEWER)
    exports = client.get("/usage/?days=7").context["exports"]
    assert set(exports) == {
        "by day",
        "by model",
        "by deployment",
        "by API key",
        "by project",
        "by user",
    }
    response = client.get(exports["by deployment"])
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = {row["label"]: row for row in csv.DictReader(io.StringIO(response.content.decode()))}
    assert rows["chat"]["input_tokens"] == "3000"
    assert rows["big"]["gpu_seconds"] == "1800"


def test_an_unknown_range_falls_back_to_30_days(console, organization):
    client = console(organization, Role.VIEWER)
    assert client.get("/usage/?days=abc").context["days"] == 30
    assert client.get("/usage/?days=5").context["days"] == 30
    assert client.get("/usage/?days=7").context["days"] == 7


def test_usage_is_the_organizations_own(console, organization, other_organization, usage):
    response = console(other_organization, Role.OWNER).get("/usage/")
    assert response.context["total"].requests == 0


def test_the_upcoming_invoice_has_a_line_for_the_tokens(console, organization, usage):
    client = console(organization, Role.BILLING)
    listing = client.get("/invoices/")
    assert listing.status_code == 200
    assert "Upcoming" in listing.content.decode()
    response = client.get("/invoices/upcoming")
    body = response.content.decode()
    assert f"{usage.model.slug}:v1 — input tokens" in body
    assert "Dedicated deployment big" in body
    # Each line is rounded: $0.003 of input and of output tokens are $0.00 each, plus $2.
    assert "<strong>$2.00</strong>" in body


def test_issued_invoices_have_a_page_and_a_pdf(console, organization, usage):
    period = period_containing(timezone.now())
    billing_period_close(period_start=period.start, now=period.end + timedelta(minutes=1))
    client = console(organization, Role.ADMIN)
    invoice = client.get("/invoices/").context["invoices"][0]
    page = client.get(f"/invoices/{invoice.number}/")
    assert page.status_code == 200
    assert invoice.number in page.content.decode()
    assert f'href="/api/v1/invoices/{invoice.pk}.pdf"' in page.content.decode()
    pdf = client.get(f"/api/v1/invoices/{invoice.pk}.pdf")
    assert pdf["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    assert client.get("/invoices/INV-NOPE/").status_code == 404


def test_invoices_are_for_billing_roles(console, organization, usage):
    for role in (Role.VIEWER, Role.DEVELOPER):
        client = console(organization, role)
        assert client.get("/invoices/").status_code == 403
        assert client.get("/invoices/upcoming").status_code == 403
        assert 'href="/invoices/"' not in client.get("/usage/").content.decode()
    assert console(organization, Role.BILLING).get("/invoices/").status_code == 200


def test_another_organizations_invoice_is_a_404(console, organization, other_organization, usage):
    period = period_containing(timezone.now())
    billing_period_close(period_start=period.start, now=period.end + timedelta(minutes=1))
    theirs = console(organization, Role.OWNER).get("/invoices/").context["invoices"][0]
    client = console(other_organization, Role.OWNER)
    assert client.get(f"/invoices/{theirs.number}/").status_code == 404


def test_usage_and_invoice_pages_run_a_constant_number_of_queries(console, organization, usage):
    client = console(organization, Role.OWNER)

    def count(path):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(path).status_code == 200
        return len(queries)

    few = count("/usage/"), count("/invoices/")
    for index in range(10):
        version = ModelVersionFactory()
        TokenPriceFactory(model_version=version, effective_from=timezone.now() - timedelta(days=9))
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            deployment_id=DeploymentFactory(organization=organization, name=f"d{index}").pk,
        )
    usage_events_ingest()
    assert (count("/usage/"), count("/invoices/")) == few
