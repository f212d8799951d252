"""Budgets: alerts at 50/80/100 % once per period each, and the gateway's hard limit."""

from decimal import Decimal

import pytest
from django.core import mail

from billing.ledger import usage_events_ingest
from billing.models import BudgetAlert
from billing.selectors import budget_alerts_current, organization_spend_position
from tests.billing.conftest import NOW
from tests.billing.factories import UsageEventFactory

pytestmark = pytest.mark.django_db


def blocked(organization) -> bool:
    position = organization_spend_position(organization_id=organization.pk, now=NOW)
    return position.limit is not None and position.spend >= position.limit


def spend(organization, version, dollars):
    # 2M input tokens at $0.50 per 1M = $1.00
    for _ in range(dollars):
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            prompt_tokens=2_000_000,
            completion_tokens=0,
            finished_at=NOW,
        )


def test_alerts_at_50_80_and_100_percent_once_each(
    organization, version, price, django_capture_on_commit_callbacks
):
    organization.monthly_spend_limit = Decimal("10.00")
    organization.save()
    with django_capture_on_commit_callbacks(execute=True):
        spend(organization, version, 4)
        usage_events_ingest(now=NOW)
    assert not BudgetAlert.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        spend(organization, version, 1)
        usage_events_ingest(now=NOW)
    assert list(BudgetAlert.objects.values_list("threshold_percent", flat=True)) == [50]
    assert len(mail.outbox) == 1
    assert "50%" in mail.outbox[0].subject
    assert mail.outbox[0].to == [organization.billing_email]
    assert not blocked(organization)

    with django_capture_on_commit_callbacks(execute=True):
        spend(organization, version, 6)  # 11.00: past 80 and 100 in one batch
        usage_events_ingest(now=NOW)
    assert sorted(BudgetAlert.objects.values_list("threshold_percent", flat=True)) == [50, 80, 100]
    assert len(mail.outbox) == 3
    assert "refused" in mail.outbox[-1].body or "refused" in mail.outbox[-2].body
    assert blocked(organization)
    assert [
        a.threshold_percent for a in budget_alerts_current(organization=organization, now=NOW)
    ] == [
        100,
        80,
        50,
    ]

    with django_capture_on_commit_callbacks(execute=True):
        spend(organization, version, 1)
        usage_events_ingest(now=NOW)
    assert BudgetAlert.objects.count() == 3
    assert len(mail.outbox) == 3


def test_no_limit_never_blocks_and_a_zero_limit_always_does(organization, version, price):
    spend(organization, version, 3)
    usage_events_ingest(now=NOW)
    assert not blocked(organization)
    organization.monthly_spend_limit = Decimal("0")
    organization.save()
    assert blocked(organization)
    assert organization_spend_position(organization_id=10**9, now=NOW) is None


def test_the_position_counts_usage_not_ingested_yet(
    organization, version, price, django_assert_num_queries
):
    organization.monthly_spend_limit = Decimal("10.00")
    organization.save()
    spend(organization, version, 2)
    usage_events_ingest(now=NOW)
    spend(organization, version, 3)  # not ingested: still counted, at the price in force
    position = organization_spend_position(organization_id=organization.pk, now=NOW)
    assert (position.spend, position.limit, position.currency) == (
        Decimal("5.00"),
        Decimal("10.00"),
        organization.currency,
    )
    assert position.spend < position.limit
    # Three queries, and one per model version with usage waiting for ingestion.
    with django_assert_num_queries(4):
        organization_spend_position(organization_id=organization.pk, now=NOW)
    usage_events_ingest(now=NOW)
    with django_assert_num_queries(3):
        again = organization_spend_position(organization_id=organization.pk, now=NOW)
    assert again.spend == Decimal("5.00")
