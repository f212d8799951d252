"""Partner models in billing: invoiced per token at our price on lines of their own, the
provider's cost recorded on the ledger, the operators' margin report (REST and CSV), and
billing_reconcile holding both to the ledger."""

import csv
import io
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import Invoice, UsageRecord
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory
from tests.factories import OrganizationFactory, UserFactory
from tests.partner import make_partner_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def partner(db):
    from catalog.models import ProviderCost, TokenPrice

    version, connection = make_partner_model("https://api.mistral.ai/v1")
    # Our price $3 / $9 and the provider's cost $2 / $6 per million, in force for February.
    TokenPrice.objects.filter(model_version=version).update(effective_from=at(2026, 1, 1))
    ProviderCost.objects.filter(model_version=version).update(effective_from=at(2026, 1, 1))
    return version, connection


@pytest.fixture
def operator():
    client = APIClient()
    client.force_login(UserFactory(is_staff=True))
    return client


def partner_event(organization, version, connection, **fields):
    return UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        provider_connection_id=connection.pk,
        finished_at=at(2026, 2, 3),
        **fields,
    )


def test_partner_usage_is_invoiced_at_our_price_and_its_cost_recorded(partner, operator):
    version, connection = partner
    first, second = OrganizationFactory(), OrganizationFactory()
    partner_event(first, version, connection, prompt_tokens=1_000_000, completion_tokens=500_000)
    partner_event(first, version, connection, prompt_tokens=1_000_000, completion_tokens=0)
    partner_event(second, version, connection, prompt_tokens=333, completion_tokens=777)
    usage_events_ingest(now=NOW)

    record = UsageRecord.objects.filter(organization=first).order_by("output_tokens").last()
    assert record.provider_connection_id == connection.pk
    assert record.provider_currency == "USD"
    assert record.amount == Decimal("7.5")  # 1M × $3 + 0.5M × $9
    assert record.provider_cost == Decimal("5")  # 1M × $2 + 0.5M × $6

    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    invoice = Invoice.objects.get(organization=first)
    lines = {line.description: line.amount for line in invoice.lines.all()}
    label = "mistral-large:24.11 (hosted by Mistral AI)"
    assert lines[f"{label} — input tokens"] == Decimal("6.00")
    assert lines[f"{label} — output tokens"] == Decimal("4.50")

    response = operator.get("/api/v1/billing/margins?month=2026-02")
    assert response.status_code == 200, response.content
    (row,) = response.json()["results"]
    # Revenue as invoiced: 6.00 + 4.50 for the first, 0.00 + 0.01 for the second (333 × $3/M
    # rounds to 0.00, 777 × $9/M to 0.01); cost 5 + 2 + 0.005328 → 7.01.
    assert row["provider"] == connection.name and row["requests"] == 3
    assert (row["revenue"], row["provider_cost"], row["margin"]) == ("10.51", "7.01", "3.50")
    assert row["currency"] == row["provider_currency"] == "USD"

    exported = operator.get("/api/v1/billing/margins?month=2026-02&format=csv")
    assert exported.status_code == 200 and exported["content-type"].startswith("text/csv")
    (csv_row,) = csv.DictReader(io.StringIO(exported.content.decode()))
    assert (csv_row["revenue"], csv_row["provider_cost"], csv_row["margin"]) == (
        "10.51",
        "7.01",
        "3.50",
    )

    out = StringIO()
    call_command("billing_reconcile", "--period", "2026-02", "--no-stripe", stdout=out)
    assert "agree" in out.getvalue()


def test_the_margin_report_is_for_operators_and_checks_its_month(partner, api, operator):
    assert api.get("/api/v1/billing/margins?month=2026-02").status_code == 403
    bad = operator.get("/api/v1/billing/margins?month=February")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "month"
    assert operator.get("/api/v1/billing/margins?month=2026-02&x=1").status_code == 400


def test_reconcile_finds_a_provider_cost_that_does_not_match(partner):
    version, connection = partner
    organization = OrganizationFactory()
    partner_event(organization, version, connection, prompt_tokens=1000, completion_tokens=10)
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    # The cost in force changes under the ledger (back-dated, which the services refuse).
    from catalog.models import ProviderCost

    ProviderCost.objects.filter(model_version=version).update(input_per_million=Decimal("2.5"))
    out = StringIO()
    with pytest.raises(CommandError):
        call_command("billing_reconcile", "--period", "2026-02", "--no-stripe", stdout=out)
    assert "provider cost" in out.getvalue()
