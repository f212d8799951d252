"""Closing periods: invoices equal the ledger, are numbered without gaps, and are made once."""

from decimal import Decimal

import pytest
from django.test import override_settings

from accounts.actors import Actor
from billing.invoicing import (
    billing_period_close,
    billing_periods_close_due,
    invoice_draft,
)
from billing.ledger import usage_events_ingest
from billing.models import (
    BillingPeriod,
    ImmutableRowError,
    Invoice,
    InvoiceLine,
    NumberSequence,
)
from billing.services import credit_grant_create, credit_note_create
from controlplane.errors import ValidationFailed
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db
FEB = at(2026, 2, 1)
FEB_10 = at(2026, 2, 10)


def use(organization, version, *, prompt, completion, when=FEB_10):
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        prompt_tokens=prompt,
        completion_tokens=completion,
        finished_at=when,
    )


def test_an_invoice_has_a_line_per_model_and_token_kind(organization, version, price):
    other = ModelVersionFactory()
    TokenPriceFactory(
        model_version=other,
        input_per_million=Decimal("0.333333"),
        output_per_million=Decimal("0"),
        effective_from=at(2026, 1, 1),
    )
    for _ in range(3):
        use(organization, version, prompt=333_333, completion=111_111)
    use(organization, other, prompt=1_000_001, completion=7)
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created

    lines = {(line.model_version_id, line.kind): line for line in invoice.lines.all()}
    first_in = lines[(version.pk, "input_tokens")]
    assert first_in.ledger_quantity == 999_999
    assert first_in.amount_exact == Decimal("0.4999995")
    assert first_in.amount == Decimal("0.50")  # half-up, on the line only
    assert lines[(version.pk, "output_tokens")].amount == Decimal("0.50")  # 0.4999995
    assert lines[(other.pk, "input_tokens")].amount == Decimal("0.33")
    assert lines[(other.pk, "output_tokens")].amount == Decimal("0.00")
    assert invoice.subtotal == Decimal("1.33")
    assert invoice.total == invoice.subtotal
    assert invoice.number == "SIR-2026-000001"
    assert (invoice.period_start, invoice.period_end) == (FEB, at(2026, 3, 1))
    assert BillingPeriod.objects.get(start=FEB).status == "closed"


@override_settings(BILLING_TAX_RATE="0.2")
def test_tax_on_the_rounded_subtotal_and_credits_after_tax(organization, version, price):
    use(organization, version, prompt=10_000_000, completion=1_000_000)  # 5.00 + 1.50
    usage_events_ingest(now=NOW)
    grant = credit_grant_create(
        actor=Actor.system(organization),
        organization=organization,
        amount=Decimal("5.00"),
        description="welcome",
    )
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    assert (invoice.subtotal, invoice.tax, invoice.credits_applied, invoice.total) == (
        Decimal("6.50"),
        Decimal("1.30"),
        Decimal("5.00"),
        Decimal("2.80"),
    )
    assert [(line.kind, line.amount) for line in invoice.lines.all()][-2:] == [
        ("tax", Decimal("1.30")),
        ("credits", Decimal("-5.00")),
    ]
    assert sum(line.amount for line in invoice.lines.all()) == invoice.total
    grant.refresh_from_db()
    assert grant.remaining == 0


def test_closing_twice_makes_each_invoice_once_with_gapless_numbers(version, price):
    orgs = [OrganizationFactory() for _ in range(4)]
    for org in orgs:
        use(org, version, prompt=1000, completion=1000)
    usage_events_ingest(now=NOW)
    first = billing_period_close(period_start=FEB, now=NOW)
    again = billing_period_close(period_start=FEB, now=NOW)
    assert len(first.created) == 4
    assert (len(again.created), again.skipped) == (0, 4)
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == [f"SIR-2026-{n:06d}" for n in range(1, 5)]


def test_a_close_killed_midway_resumes_with_the_same_invoices(version, price, monkeypatch):
    import billing.invoicing as invoicing

    orgs = [OrganizationFactory() for _ in range(3)]
    for org in orgs:
        use(org, version, prompt=1000, completion=1000)
    usage_events_ingest(now=NOW)
    real_finalize = invoicing.invoices_finalize
    calls = []

    def dies_in_the_second_chunk(**kwargs):
        calls.append([o.pk for o in kwargs["organizations"]])
        if len(calls) == 2:
            raise KeyboardInterrupt("worker killed")
        return real_finalize(**kwargs)

    monkeypatch.setattr(invoicing, "invoices_finalize", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        billing_period_close(period_start=FEB, now=NOW, chunk_size=1)
    assert Invoice.objects.count() == 1
    assert BillingPeriod.objects.get(start=FEB).status == "closing"
    monkeypatch.setattr(invoicing, "invoices_finalize", real_finalize)
    result = billing_period_close(period_start=FEB, now=NOW, chunk_size=2)
    assert len(result.created) == 2
    invoices = Invoice.objects.order_by("organization_id")
    assert [i.organization_id for i in invoices] == sorted(o.pk for o in orgs)
    assert sorted(i.number for i in invoices) == [f"SIR-2026-{n:06d}" for n in (1, 2, 3)]
    assert NumberSequence.objects.get(name="invoice-2026").last_value == 3


def test_a_period_that_has_not_ended_cannot_close():
    with pytest.raises(ValidationFailed, match="has not ended"):
        billing_period_close(period_start=at(2026, 3, 1), now=NOW)
    with pytest.raises(ValueError, match="does not start"):
        billing_period_close(period_start=at(2026, 2, 2), now=NOW)


def test_the_beat_closes_every_ended_period(organization, version, price):
    use(organization, version, prompt=1, completion=1, when=at(2026, 1, 20))
    use(organization, version, prompt=1, completion=1, when=at(2026, 2, 20))
    use(organization, version, prompt=1, completion=1, when=at(2026, 3, 2))
    usage_events_ingest(now=NOW)
    results = billing_periods_close_due(now=NOW)
    assert [r.period.label for r in results] == ["2026-01", "2026-02"]
    assert Invoice.objects.count() == 2
    assert billing_periods_close_due(now=NOW) == []


def test_the_draft_is_what_the_close_writes(organization, version, price):
    for n in range(5):
        use(organization, version, prompt=123_457 * n, completion=98_765, when=at(2026, 2, 1 + n))
    usage_events_ingest(now=at(2026, 2, 20))
    draft = invoice_draft(organization=organization, now=at(2026, 2, 20))
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    assert [(line.kind, line.quantity, line.amount) for line in draft.all_lines] == [
        (line.kind, line.quantity, line.amount) for line in invoice.lines.all()
    ]
    assert (draft.subtotal, draft.tax, draft.total) == (
        invoice.subtotal,
        invoice.tax,
        invoice.total,
    )


def test_finalized_invoices_are_immutable_and_corrected_by_credit_notes(
    organization, version, price
):
    use(organization, version, prompt=2_000_000, completion=0)
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    invoice.total = Decimal("0.01")
    with pytest.raises(ImmutableRowError):
        invoice.save()
    with pytest.raises(ImmutableRowError):
        invoice.delete()
    with pytest.raises(ImmutableRowError):
        InvoiceLine.objects.filter(invoice=invoice).update(amount=0)
    invoice.refresh_from_db()
    invoice.payment_status = Invoice.PaymentStatus.PAID
    invoice.save()  # payment status may change

    actor = Actor.system(organization)
    note = credit_note_create(
        actor=actor, invoice=invoice, amount=Decimal("0.40"), reason="outage on Feb 3"
    )
    assert note.number == "SIR-CN-2026-000001"
    assert note.invoice == invoice
    with pytest.raises(ValidationFailed, match=r"at most 0\.60"):
        credit_note_create(actor=actor, invoice=invoice, amount=Decimal("0.61"), reason="x")
    with pytest.raises(ValidationFailed):
        credit_note_create(actor=actor, invoice=invoice, amount=Decimal("0.001"), reason="x")


def test_organizations_without_usage_get_no_invoice(organization, version, price):
    OrganizationFactory()
    use(organization, version, prompt=1, completion=0)
    usage_events_ingest(now=NOW)
    assert len(billing_period_close(period_start=FEB, now=NOW).created) == 1


def test_yen_invoices_round_to_whole_yen(version):
    org = OrganizationFactory(currency="JPY")
    TokenPriceFactory(
        model_version=version,
        currency="JPY",
        input_per_million=Decimal("75"),
        output_per_million=Decimal("225"),
        effective_from=at(2026, 1, 1),
    )
    use(org, version, prompt=10_000, completion=10_000)  # 0.75 + 2.25 yen
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    assert [line.amount for line in invoice.lines.all()] == [Decimal(1), Decimal(2)]
    assert invoice.total == Decimal(3)


@pytest.mark.django_db(transaction=True)
def test_concurrent_closes_number_invoices_once_and_without_gaps(version, price):
    import threading

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite serializes writers; the race needs PostgreSQL's row locks")
    orgs = [OrganizationFactory() for _ in range(6)]
    for org in orgs:
        use(org, version, prompt=1000, completion=1000)
    usage_events_ingest(now=NOW)
    errors = []

    def close():
        try:
            billing_period_close(period_start=FEB, now=NOW)
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=close) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(Invoice.objects.values_list("number", flat=True)) == [
        f"SIR-2026-{n:06d}" for n in range(1, 7)
    ]
    assert Invoice.objects.values("organization").distinct().count() == 6
