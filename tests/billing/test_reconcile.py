from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import UsageRecord
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory

pytestmark = pytest.mark.django_db


def reconcile(*args):
    out = StringIO()
    call_command("billing_reconcile", *args, stdout=out)
    return out.getvalue()


def test_a_clean_month_reconciles(organization, version, price):
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=at(2026, 2, 3),
        prompt_tokens=2_000_000,
        completion_tokens=0,
    )
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    out = reconcile("--period", "2026-02")
    assert "agree" in out
    assert organization.slug in out
    assert "SIR-2026-000001" in out


def test_every_difference_is_printed_and_the_exit_is_non_zero(organization, version, price):
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=at(2026, 2, 3),
        prompt_tokens=2_000_000,
        completion_tokens=0,
    )
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=at(2026, 2, 1), now=NOW)
    # A row written behind the ledger's back (not through ingestion, so no rollup either).
    UsageRecord.objects.create(
        request_id="smuggled",
        organization=organization,
        period_start=at(2026, 2, 1),
        occurred_at=at(2026, 2, 4),
        model="m",
        model_version_id=version.pk,
        token_price_id=price.pk,
        input_tokens=1_000_000,
        output_tokens=0,
        currency="USD",
        input_price_per_million=Decimal("0.5"),
        output_price_per_million=Decimal("1.5"),
        amount=Decimal("0.5"),
        ingested_at=NOW,
    )
    out = StringIO()
    with pytest.raises(CommandError) as error:
        call_command("billing_reconcile", "--period", "2026-02", stdout=out)
    assert error.value.returncode == 1
    text = out.getvalue()
    assert "ledger 3000000 units = 1.50 USD, invoice 2000000 units = 1.00 USD" in text
    assert "rollups" in text


def test_bad_periods(db):
    with pytest.raises(CommandError, match="YYYY-MM"):
        reconcile("--period", "2026/02")
    with pytest.raises(CommandError, match="has not ended"):
        reconcile("--period", "2999-01")


def test_operator_commands_grant_credit_and_issue_credit_notes(organization, version, price):
    out = StringIO()
    call_command("billing_grant_credit", "--org", organization.slug, "--amount", "0.40", stdout=out)
    assert "granted 0.40 USD" in out.getvalue()
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=at(2026, 2, 3),
        prompt_tokens=2_000_000,
        completion_tokens=0,
    )
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=at(2026, 2, 1), now=NOW).created
    assert (invoice.credits_applied, invoice.total) == (Decimal("0.40"), Decimal("0.60"))
    out = StringIO()
    call_command(
        "billing_credit_note",
        "--invoice",
        invoice.number,
        "--amount",
        "0.25",
        "--reason",
        "slow responses",
        stdout=out,
    )
    assert "SIR-CN-2026-000001: 0.25 USD credited" in out.getvalue()
    with pytest.raises(CommandError, match="at most"):
        call_command(
            "billing_credit_note", "--invoice", invoice.number, "--amount", "5", "--reason", "x"
        )
    with pytest.raises(CommandError, match="No invoice"):
        call_command("billing_credit_note", "--invoice", "nope", "--amount", "1", "--reason", "x")
    with pytest.raises(CommandError, match="No organization"):
        call_command("billing_grant_credit", "--org", "nope", "--amount", "1")
    with pytest.raises(CommandError, match="minor units"):
        call_command("billing_grant_credit", "--org", organization.slug, "--amount", "0.001")


def test_credits_are_audited_with_who_made_them(organization, version, price, admin_user):
    from accounts.models import AuditLogEntry

    call_command(
        "billing_grant_credit", "--org", organization.slug, "--amount", "0.40",
        "--by", admin_user.email, stdout=StringIO(),
    )  # fmt: skip
    grant_entry = AuditLogEntry.objects.get(action="credit_grant.create")
    assert grant_entry.organization == organization
    assert (grant_entry.actor_user, grant_entry.actor_label) == (admin_user, admin_user.email)
    assert grant_entry.changes["amount"] == "0.40" and grant_entry.changes["currency"] == "USD"
    assert organization.credit_grants.get().created_by == admin_user.email
    with pytest.raises(CommandError, match="no user has that email"):
        call_command(
            "billing_grant_credit", "--org", organization.slug, "--amount", "1", "--by", "x@y.z"
        )

    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        finished_at=at(2026, 2, 3),
        prompt_tokens=2_000_000,
        completion_tokens=0,
    )
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=at(2026, 2, 1), now=NOW).created
    finalized = AuditLogEntry.objects.get(action="invoice.finalize")
    assert (finalized.organization, finalized.target_id) == (organization, str(invoice.pk))
    assert (finalized.actor_label, finalized.changes["total"]) == ("system", "0.60")

    call_command(
        "billing_credit_note", "--invoice", invoice.number, "--amount", "0.25",
        "--reason", "slow responses", stdout=StringIO(),
    )  # fmt: skip
    note_entry = AuditLogEntry.objects.get(action="credit_note.create")
    assert note_entry.organization == organization and note_entry.actor_label == "system"
    assert note_entry.changes == {
        "invoice": invoice.number,
        "amount": "0.25",
        "currency": "USD",
        "reason": "slow responses",
    }
    # The customer's owners see it in their audit log.
    assert AuditLogEntry.objects.filter(organization=organization).count() == 3
