"""Payouts to publishers through Stripe Connect, against localstripe extended with accounts,
account links, transfers and their webhooks: a statement is transferred once — even when the
first call times out after Stripe made the transfer and the task runs again — and the webhook
marks it paid (or reversed), once per event."""

import json
import time
from decimal import Decimal

import httpx
import pytest

from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import PublisherStatement, StripeEvent
from billing.payouts import publisher_connect_account, statement_payout
from billing.tasks import statements_payout_due
from catalog.models import Publisher
from tests.billing.conftest import NOW, at, use
from tests.billing.test_stripe import post, remote, signed
from tests.factories import OrganizationFactory

pytestmark = [pytest.mark.django_db, pytest.mark.slow]  # starts the localstripe server
FEB = at(2026, 2, 1)


def closed_statement(listed) -> PublisherStatement:
    _publisher, _listing, version = listed
    use(OrganizationFactory(), version, prompt=10_000_000, completion=2_000_000)  # 8.00
    usage_events_ingest(now=NOW)
    billing_period_close(period_start=FEB, now=NOW)
    return PublisherStatement.objects.get()


def connect(publisher, operator_actor) -> str:
    url = publisher_connect_account(
        actor=operator_actor,
        publisher=publisher,
        refresh_url="https://console.example/publisher/payouts",
        return_url="https://console.example/publisher/payouts?done=1",
    )
    publisher.refresh_from_db()
    return url


def transfer_event(event_type, transfer, event_id) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "data": {"object": transfer},
        }
    ).encode()


def test_a_statement_is_transferred_once_even_when_the_task_runs_again(
    listed, operator_actor, stripe_on, django_capture_on_commit_callbacks
):
    publisher = listed[0]
    # Closing with no connected account: the payout waits (no transfer, nothing failed).
    with django_capture_on_commit_callbacks(execute=True):
        statement = closed_statement(listed)
    statement.refresh_from_db()
    assert (statement.payout_status, statement.total) == ("pending", Decimal("2.40"))

    # Stripe makes the transfer, then answers too late: the first attempt times out.
    httpx.post(
        f"{stripe_on}/_config/delay", json={"path": "/v1/transfers", "seconds": 2, "count": 1}
    )
    with django_capture_on_commit_callbacks(execute=True):
        url = connect(publisher, operator_actor)
    assert url.startswith("https://connect.stripe.com/")
    account = remote(stripe_on, f"/v1/accounts/{publisher.stripe_account_id}")
    assert account["type"] == "express" and account["capabilities"] == {"transfers": "active"}
    statement.refresh_from_db()
    assert statement.payout_status == "failed" and statement.payout_attempts == 1
    assert statement.stripe_transfer_id == ""
    time.sleep(2)

    # The retry (task, beat sweep, twice) finds Stripe's first transfer, and only it.
    assert statement_payout(statement_id=statement.pk).payout_status == "transferred"
    PublisherStatement.objects.filter(pk=statement.pk).update(payout_next_attempt_at=None)
    statements_payout_due.delay()
    statement_payout(statement_id=statement.pk)
    statement.refresh_from_db()
    transfers = remote(stripe_on, "/v1/transfers")["data"]
    mine = [t for t in transfers if t["destination"] == publisher.stripe_account_id]
    assert len(mine) == 1
    [transfer] = mine
    assert transfer["id"] == statement.stripe_transfer_id
    assert (transfer["amount"], transfer["currency"]) == (240, "usd")
    assert transfer["metadata"]["sirocco_statement_number"] == statement.number
    assert transfer["transfer_group"] == statement.number

    # A connected account is made once: asking for another onboarding link reuses it.
    before = publisher.stripe_account_id
    connect(publisher, operator_actor)
    assert Publisher.objects.get(pk=publisher.pk).stripe_account_id == before


def test_the_webhook_marks_the_payout_paid_then_reversed_once_per_event(
    listed, operator_actor, stripe_on, client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        statement = closed_statement(listed)
        connect(listed[0], operator_actor)
    statement.refresh_from_db()
    assert statement.payout_status == "transferred"
    transfer = remote(stripe_on, f"/v1/transfers/{statement.stripe_transfer_id}")

    created = transfer_event("transfer.created", transfer, "evt_tr_created")
    assert post(client, created, signed(created)).json() == {"received": True, "duplicate": False}
    statement.refresh_from_db()
    assert statement.payout_status == "paid" and statement.paid_at is not None
    assert post(client, created, signed(created)).json()["duplicate"] is True

    reversed_ = transfer_event("transfer.reversed", transfer, "evt_tr_reversed")
    assert post(client, reversed_, signed(reversed_)).status_code == 200
    statement.refresh_from_db()
    assert statement.payout_status == "reversed"
    assert StripeEvent.objects.filter(type__startswith="transfer.").count() == 2
    # The amounts of a final statement never change with its payout.
    assert statement.total == Decimal("2.40")


def test_the_publisher_links_its_account_over_rest(listed, stripe_on, key_client):
    from accounts.roles import Role

    publisher = listed[0]
    developer = key_client(publisher.organization, Role.DEVELOPER)
    body = {"refresh_url": "https://x.example/r", "return_url": "https://x.example/d"}
    assert (
        developer.post("/api/v1/publishers/acme/payout-account", body, format="json").status_code
        == 403
    )
    owner = key_client(publisher.organization, Role.OWNER)
    answer = owner.post("/api/v1/publishers/acme/payout-account", body, format="json")
    assert answer.status_code == 200, answer.json()
    assert answer.json()["onboarding_url"].startswith("https://connect.stripe.com/")
    # Only operators name an existing account.
    refused = owner.post(
        "/api/v1/publishers/acme/payout-account", {"account_id": "acct_x"}, format="json"
    )
    assert refused.status_code == 403
