"""REST: /api/v1/usage, /api/v1/invoices (+ upcoming, detail, PDF, CSV)."""

import csv
import io
from datetime import UTC, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.roles import Role
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.periods import period_containing
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import TokenPriceFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def priced_version(version):
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=timezone.now() - timedelta(days=400),
    )
    return version


def today():
    return timezone.now().astimezone(UTC).date()


def test_usage_grouped_by_model_key_and_day(organization, api, priced_version, make_api_key):
    key, _ = make_api_key(organization, name="backend")
    now = timezone.now()
    UsageEventFactory.create_batch(
        3,
        organization=organization,
        model_version_id=priced_version.pk,
        api_key=key,
        finished_at=now,
    )
    UsageEventFactory(
        organization=organization, model_version_id=priced_version.pk, finished_at=now
    )
    usage_events_ingest(now=now)

    body = api.get("/api/v1/usage?group_by=model").json()
    assert body["currency"] == "USD"
    [row] = body["results"]
    assert row["model"] == str(priced_version.pk)
    assert row["label"] == str(priced_version)
    assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (4, 4000, 2000)
    assert row["amount"] == "0.005000"

    by_key = api.get("/api/v1/usage?group_by=api_key").json()["results"]
    assert {(r["api_key"], r["requests"]) for r in by_key} == {(str(key.pk), 3), (None, 1)}
    assert next(r for r in by_key if r["api_key"])["label"].startswith("backend (sk-")

    by_day = api.get(f"/api/v1/usage?group_by=day&start={today()}&end={today()}").json()
    assert [r["day"] for r in by_day["results"]] == [today().isoformat()]


def test_usage_as_csv(organization, api, priced_version):
    UsageEventFactory(organization=organization, model_version_id=priced_version.pk)
    usage_events_ingest()
    for response in (
        api.get("/api/v1/usage?format=csv&group_by=deployment"),
        api.get("/api/v1/usage?group_by=deployment", HTTP_ACCEPT="text/csv"),
    ):
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert rows[0]["deployment"] == ""
        assert rows[0]["requests"] == "1"
        assert rows[0]["amount"] == "0.001250"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("group_by=week", "group_by"),
        ("start=2026-03-10&end=2026-03-01", "end"),
        ("start=2999-01-01&end=2999-01-02", "start"),
        ("end=2999-01-01", "end"),
        ("start=yesterday", "start"),
        ("from=2026-01-01", "from"),
        ("start=2020-01-01", "start"),
    ],
)
def test_bad_usage_queries_are_400_with_the_field(api, query, field):
    for suffix in ("", "&format=csv"):
        response = api.get(f"/api/v1/usage?{query}{suffix}")
        assert response.status_code == 400, response.content
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == field


def test_usage_is_the_callers_own(organization, other_organization, api, priced_version):
    UsageEventFactory(organization=other_organization, model_version_id=priced_version.pk)
    usage_events_ingest()
    assert api.get("/api/v1/usage?group_by=model").json()["results"] == []


def close_last_period(organization, version):
    """An invoice for the previous period, made through the real path."""
    last = period_containing(period_containing(timezone.now()).start - timedelta(seconds=1))
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=last.start + timedelta(days=1),
        prompt_tokens=2_000_000,
        completion_tokens=1_000_000,
    )
    usage_events_ingest()
    return billing_period_close(period_start=last.start).created[0]


def test_invoice_list_detail_and_documents(organization, key_client, priced_version):
    invoice = close_last_period(organization, priced_version)
    client = key_client(organization, Role.BILLING)
    [listed] = client.get("/api/v1/invoices").json()["results"]
    assert listed["number"] == invoice.number
    assert (listed["subtotal"], listed["total"], listed["currency"]) == ("2.50", "2.50", "USD")
    detail = client.get(f"/api/v1/invoices/{invoice.pk}").json()
    assert [(line["kind"], line["amount"]) for line in detail["lines"]] == [
        ("input_tokens", "1.00"),
        ("output_tokens", "1.50"),
    ]
    pdf = client.get(f"/api/v1/invoices/{invoice.pk}.pdf")
    assert pdf.status_code == 200
    assert pdf["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    assert invoice.number in pdf["Content-Disposition"]
    rows = list(
        csv.DictReader(
            io.StringIO(client.get(f"/api/v1/invoices/{invoice.pk}.csv").content.decode())
        )
    )
    assert [r["amount"] for r in rows if r["kind"] in ("input_tokens", "output_tokens")] == [
        "1.00",
        "1.50",
    ]
    assert next(r for r in rows if r["kind"] == "total")["amount"] == "2.50"


def test_another_organizations_invoice_is_404(
    organization, other_organization, key_client, priced_version
):
    invoice = close_last_period(other_organization, priced_version)
    client = key_client(organization, Role.OWNER)
    for suffix in ("", ".pdf", ".csv"):
        assert client.get(f"/api/v1/invoices/{invoice.pk}{suffix}").status_code == 404
    assert client.get("/api/v1/invoices").json()["results"] == []


def test_invoices_need_billing_read(organization, key_client):
    viewer = key_client(organization, Role.VIEWER)
    assert viewer.get("/api/v1/invoices").status_code == 403
    assert viewer.get("/api/v1/invoices/upcoming").status_code == 403
    assert viewer.get("/api/v1/usage").status_code == 200


def test_upcoming_is_the_live_draft(organization, key_client, priced_version):
    UsageEventFactory(
        organization=organization,
        model_version_id=priced_version.pk,
        prompt_tokens=1_000_000,
        completion_tokens=0,
    )
    usage_events_ingest()
    body = key_client(organization, Role.BILLING).get("/api/v1/invoices/upcoming").json()
    assert (body["id"], body["number"], body["status"]) == (None, None, "draft")
    assert body["period"] == period_containing(timezone.now()).label
    assert [(line["kind"], line["amount"]) for line in body["lines"]] == [("input_tokens", "0.50")]
    assert body["total"] == "0.50"


def test_invoice_list_runs_a_constant_number_of_queries(organization, key_client, priced_version):
    from accounts.actors import Actor
    from billing.services import credit_note_create

    client = key_client(organization, Role.OWNER)
    client.get("/api/v1/organizations/current")
    invoice = close_last_period(organization, priced_version)
    credit_note_create(
        actor=Actor.system(organization), invoice=invoice, amount=Decimal("0.10"), reason="goodwill"
    )

    def count():
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/api/v1/invoices").status_code == 200
        return len(queries)

    few = count()
    from billing.models import Invoice

    start = invoice.period_start
    for n in range(10):
        earlier = period_containing(start - timedelta(seconds=1))
        start = earlier.start
        Invoice.objects.create(
            organization=organization,
            number=f"T-{n}",
            period_start=earlier.start,
            period_end=earlier.end,
            currency="USD",
            finalized_at=timezone.now(),
        )
    assert count() == few


def test_operators_see_billing_in_the_admin(admin_client, organization, priced_version):
    invoice = close_last_period(organization, priced_version)
    assert admin_client.get("/admin/billing/invoice/").status_code == 200
    assert admin_client.get(f"/admin/billing/invoice/{invoice.pk}/change/").status_code == 200
    response = admin_client.post(
        "/admin/billing/creditgrant/add/",
        {"organization": organization.pk, "amount": "10.00", "description": "launch promo"},
    )
    assert response.status_code == 302
    grant = organization.credit_grants.get()
    assert (grant.remaining, grant.created_by) == (Decimal("10.00"), "admin@example.com")


def test_the_usage_report_runs_a_constant_number_of_queries(organization, api, make_api_key):
    from tests.catalog.factories import ModelVersionFactory

    api.get("/api/v1/organizations/current")

    def seed(n):
        for _ in range(n):
            version = ModelVersionFactory()
            TokenPriceFactory(
                model_version=version, effective_from=timezone.now() - timedelta(days=9)
            )
            key, _ = make_api_key(organization)
            UsageEventFactory(organization=organization, model_version_id=version.pk, api_key=key)
        usage_events_ingest()

    def count(group_by):
        with CaptureQueriesContext(connection) as queries:
            assert api.get(f"/api/v1/usage?group_by={group_by}").status_code == 200
        return len(queries)

    seed(1)
    few = {g: count(g) for g in ("model", "api_key", "deployment", "day")}
    seed(15)
    assert {g: count(g) for g in few} == few


def test_an_unknown_usage_format_is_406(api):
    response = api.get("/api/v1/usage?format=xml")
    assert response.status_code == 406
    assert "format=csv" in response.json()["detail"]
