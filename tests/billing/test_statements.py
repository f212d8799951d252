"""Publisher statements: written at period close from the invoices' own lines (so they agree to
the cent), one share per model from the period's start, credit notes as adjustments in the
period they are issued, immutable, numbered once, checked by billing_reconcile, and rendered
as PDF and CSV."""

import csv
import io
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.roles import Role
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import (
    BillingPeriod,
    ImmutableRowError,
    InvoiceLine,
    PublisherStatement,
    RevenueShare,
)
from billing.periods import Period, period_containing
from billing.reconcile import reconcile_period
from billing.services import credit_note_create
from billing.statements import revenue_share_set, statements_finalize
from catalog.permissions import operator_system_actor
from controlplane.errors import Conflict, ValidationFailed
from tests.billing.conftest import NOW, at, use
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db
FEB = at(2026, 2, 1)
MAR = at(2026, 3, 1)


def test_the_statement_is_the_invoices_lines_of_the_publishers_models(listed):
    _publisher, _listing, version = listed
    other_model = ModelVersionFactory()  # not Acme's: on invoices, not on the statement
    TokenPriceFactory(model_version=other_model, effective_from=at(2026, 1, 1))
    buyers = [OrganizationFactory(), OrganizationFactory()]
    use(buyers[0], version, prompt=333_333, completion=111_111)
    use(buyers[0], version, prompt=333_333, completion=111_111)
    use(buyers[1], version, prompt=1_000_001, completion=7)
    use(buyers[1], other_model, prompt=5_000_000, completion=5_000_000)
    usage_events_ingest(now=NOW)
    invoices = billing_period_close(period_start=FEB, now=NOW).created
    assert len(invoices) == 2

    [statement] = PublisherStatement.objects.all()
    lines = InvoiceLine.objects.filter(model_version_id=version.pk)
    invoiced = sum((line.amount for line in lines), Decimal(0))
    assert statement.revenue == invoiced == Decimal("1.16")  # 0.33 + 0.33 + 0.50 + 0.00
    assert statement.share == Decimal("0.35")  # 30 % of 1.16 = 0.348, rounded once
    assert statement.total == statement.share and statement.adjustments == 0
    assert statement.number == "SIR-PS-2026-000001"
    assert statement.payout_status == "pending"
    [line] = statement.lines.all()
    assert (line.input_tokens, line.output_tokens, line.customers) == (1_666_667, 222_229, 2)
    assert line.share_percent == Decimal("30.00")
    assert reconcile_period(Period(FEB, MAR), check_stripe=False).differences == []

    # Immutable; a rerun of the close writes nothing new.
    statement.total = Decimal("100")
    with pytest.raises(ImmutableRowError):
        statement.save()
    with pytest.raises(ImmutableRowError):
        line.delete()
    billing_period_close(period_start=FEB, now=NOW)
    assert PublisherStatement.objects.count() == 1


def test_a_credit_note_adjusts_the_statement_of_the_period_it_is_issued_in(listed):
    _publisher, _listing, version = listed
    buyer = OrganizationFactory()
    use(buyer, version, prompt=10_000_000, completion=2_000_000)  # 5.00 + 3.00
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    assert PublisherStatement.objects.get().share == Decimal("2.40")

    # Half of the invoice is credited later: the publisher gives back 30 % of it then.
    note = credit_note_create(
        actor=operator_system_actor(), invoice=invoice, amount=Decimal("4.00"), reason="outage"
    )
    current = period_containing(timezone.now())
    [adjusted] = statements_finalize(period=current)
    [line] = adjusted.lines.all()
    assert line.kind == "adjustment" and line.credit_note_id == note.pk
    assert (line.revenue, line.share) == (Decimal("-4.00"), Decimal("-1.20"))
    assert (adjusted.revenue, adjusted.adjustments, adjusted.total) == (
        0,
        Decimal("-1.20"),
        Decimal("-1.20"),
    )
    assert adjusted.payout_status == "not_due"
    assert reconcile_period(current, check_stripe=False).differences == []


def test_reconcile_reports_a_statement_that_differs_from_the_invoices(listed, capsys):
    _publisher, _listing, version = listed
    use(OrganizationFactory(), version, prompt=10_000_000, completion=0)
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=FEB, now=NOW)
    statement = PublisherStatement.objects.get()
    # Tamper with the stored row behind the model's back, as a faulty release might.
    PublisherStatement.objects.filter(pk=statement.pk).update(share=Decimal("9.99"))
    differences = reconcile_period(Period(FEB, MAR), check_stripe=False).differences
    assert any("do not add up" in d for d in differences)
    with pytest.raises(CommandError, match="1 difference"):
        call_command("billing_reconcile", "--period", "2026-02", "--no-stripe")
    assert "DIFFERENCE statement SIR-PS-2026-000001" in capsys.readouterr().out


def test_revenue_shares_start_with_an_open_period(listed, operator_actor):
    _publisher, listing, _version = listed
    with pytest.raises(ValidationFailed, match="starts with a billing period"):
        revenue_share_set(
            actor=operator_actor,
            listing=listing,
            percent=Decimal(20),
            effective_from=at(2026, 3, 2),
        )
    BillingPeriod.objects.create(start=MAR, end=at(2026, 4, 1), status="closed")
    with pytest.raises(Conflict):
        revenue_share_set(
            actor=operator_actor, listing=listing, percent=Decimal(20), effective_from=MAR
        )
    with pytest.raises(ValidationFailed):
        revenue_share_set(
            actor=operator_actor, listing=listing, percent=Decimal("100.5"), effective_from=MAR
        )
    # From April on: 20 %; February's statement still reads 30 %.
    revenue_share_set(
        actor=operator_actor, listing=listing, percent=Decimal(20), effective_from=at(2026, 4, 1)
    )
    assert list(RevenueShare.objects.values_list("percent", flat=True)) == [
        Decimal("20.00"),
        Decimal("30.00"),
    ]


def test_statements_through_rest_pdf_and_csv(listed, key_client):
    publisher, listing, version = listed
    use(OrganizationFactory(), version, prompt=10_000_000, completion=2_000_000)
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=FEB, now=NOW)
    acme = publisher.organization
    billing_member = key_client(acme, Role.BILLING)
    [row] = billing_member.get("/api/v1/publishers/acme/statements").json()
    assert (row["number"], row["revenue"], row["share"], row["total"]) == (
        "SIR-PS-2026-000001",
        "8.00",
        "2.40",
        "2.40",
    )
    detail = billing_member.get(f"/api/v1/publishers/acme/statements/{row['number']}").json()
    assert detail["lines"][0]["revenue"] == "8.00" and detail["lines"][0]["customers"] == 1
    pdf = billing_member.get(f"/api/v1/publishers/acme/statements/{row['number']}.pdf")
    assert pdf["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    text = billing_member.get(f"/api/v1/publishers/acme/statements/{row['number']}.csv")
    rows = list(csv.DictReader(io.StringIO(text.content.decode())))
    assert [(r["kind"], r["share"]) for r in rows] == [
        ("usage", "2.40"),
        ("revenue", "8.00"),
        ("share", "2.40"),
        ("adjustments", "0.00"),
        ("total", "2.40"),
    ]
    # A developer of the publisher has no billing.read; another tenant sees nothing.
    assert (
        key_client(acme, Role.DEVELOPER).get("/api/v1/publishers/acme/statements").status_code
        == 403
    )
    assert (
        key_client(OrganizationFactory(), Role.OWNER)
        .get("/api/v1/publishers/acme/statements")
        .status_code
        == 404
    )
    # Shares: operators set them over REST, the publisher reads them.
    operator = APIClient()
    operator.force_login(UserFactory(is_staff=True))
    answer = operator.post(
        f"/api/v1/publishers/acme/listings/{listing.slug}/revenue-shares",
        {"percent": "25.50", "effective_from": "2027-01-01T00:00:00Z"},
        format="json",
    )
    assert answer.status_code == 201, answer.json()
    shares = billing_member.get(f"/api/v1/publishers/acme/listings/{listing.slug}/revenue-shares")
    assert [s["percent"] for s in shares.json()] == ["25.50", "30.00"]
    assert (
        billing_member.post(
            f"/api/v1/publishers/acme/listings/{listing.slug}/revenue-shares",
            {"percent": "99.00", "effective_from": "2027-02-01T00:00:00Z"},
            format="json",
        ).status_code
        == 403
    )
