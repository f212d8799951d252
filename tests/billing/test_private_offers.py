"""Private offers: a customer's own price replaces the list price in rating from the offer's
start (usage before keeps its price) until it expires; a publisher's proposal applies only
once an operator approved it; the customer's model page shows "your price". Run on SQLite
(the Python rating) and PostgreSQL (the set-based SQL rating) alike."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.roles import Role
from billing.invoicing import billing_period_close, invoice_draft
from billing.ledger import usage_events_ingest
from billing.models import Invoice, PublisherStatement, UsageRecord
from billing.periods import period_containing, period_starting
from billing.reconcile import reconcile_period
from catalog.models import PrivateOffer
from catalog.offers import private_offer_approve, private_offer_create, private_offer_withdraw
from controlplane.errors import Conflict, NotFound, ValidationFailed
from tests.billing.conftest import use
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


def amounts(organization):
    return [
        (r.input_price_per_million, r.output_price_per_million, r.amount)
        for r in UsageRecord.objects.filter(organization=organization).order_by("occurred_at")
    ]


def test_an_offer_rates_usage_from_its_start_until_it_expires(listed, operator_actor):
    _publisher, _listing, version = listed
    buyer, other = OrganizationFactory(), OrganizationFactory()
    start = timezone.now() + timedelta(seconds=5)
    offer = private_offer_create(
        actor=operator_actor,
        organization=buyer,
        version=version,
        discount_percent=Decimal("50"),
        starts_at=start,
        expires_at=start + timedelta(minutes=10),
    )
    assert offer.status == "approved"
    assert (offer.input_per_million, offer.output_per_million) == (
        Decimal("0.250000"),
        Decimal("0.750000"),
    )
    for when in (
        start - timedelta(minutes=1),  # before: the list price
        start,  # from its start: the offer
        start + timedelta(minutes=9),
        start + timedelta(minutes=10),  # expired: the list price again
    ):
        use(buyer, version, prompt=1_000_000, completion=1_000_000, when=when)
    use(other, version, prompt=1_000_000, completion=1_000_000, when=start + timedelta(minutes=1))
    usage_events_ingest(now=start + timedelta(minutes=11))

    list_price = (Decimal("0.5"), Decimal("1.5"), Decimal("2.0"))
    offered = (Decimal("0.25"), Decimal("0.75"), Decimal("1.0"))
    assert amounts(buyer) == [list_price, offered, offered, list_price]
    assert amounts(other) == [list_price]  # somebody else's offer is not yours
    # The live draft invoice has a line per price: the offer's usage at its rate.
    lines = invoice_draft(organization=buyer, now=start + timedelta(minutes=11)).lines
    assert sorted((line.unit_price, line.amount) for line in lines) == [
        (Decimal("0.250000"), Decimal("0.50")),
        (Decimal("0.500000"), Decimal("1.00")),
        (Decimal("0.750000"), Decimal("1.50")),
        (Decimal("1.500000"), Decimal("3.00")),
    ]


def test_a_publishers_offer_applies_once_approved_and_never_overlaps(
    listed, operator_actor, key_client
):
    publisher, _listing, version = listed
    from accounts.actors import Actor

    member = Actor(organization=publisher.organization, role=Role.DEVELOPER)
    buyer = OrganizationFactory()
    proposed = private_offer_create(
        actor=member,
        organization=buyer,
        version=version,
        input_per_million=Decimal("0.1"),
        output_per_million=Decimal("0.2"),
    )
    assert proposed.status == "proposed" and proposed.publisher == publisher
    use(buyer, version, prompt=1_000_000, completion=0, when=timezone.now())
    usage_events_ingest()
    assert amounts(buyer)[0][0] == Decimal("0.5")  # not approved yet: the list price

    approved = private_offer_approve(actor=operator_actor, offer=proposed)
    assert approved.starts_at >= proposed.starts_at
    with pytest.raises(Conflict):
        private_offer_create(
            actor=operator_actor, organization=buyer, version=version, discount_percent=Decimal(10)
        )
    use(buyer, version, prompt=1_000_000, completion=0, when=timezone.now() + timedelta(seconds=1))
    usage_events_ingest(now=timezone.now() + timedelta(seconds=2))
    assert amounts(buyer)[1][0] == Decimal("0.1")

    # Withdrawn: from now on the list price again; what was rated stays.
    private_offer_withdraw(actor=member, offer=approved)
    use(buyer, version, prompt=1_000_000, completion=0, when=timezone.now() + timedelta(seconds=3))
    usage_events_ingest(now=timezone.now() + timedelta(seconds=4))
    assert [row[0] for row in amounts(buyer)] == [Decimal("0.5"), Decimal("0.1"), Decimal("0.5")]

    # A publisher offers only its own models; nobody backdates an offer.
    stranger = Actor(organization=OrganizationFactory(), role=Role.OWNER)
    with pytest.raises(NotFound):
        private_offer_create(
            actor=stranger, organization=buyer, version=version, discount_percent=Decimal(5)
        )
    with pytest.raises(ValidationFailed, match="past"):
        private_offer_create(
            actor=operator_actor,
            organization=buyer,
            version=version,
            discount_percent=Decimal(5),
            starts_at=timezone.now() - timedelta(days=1),
        )


def test_offers_over_rest_and_your_price_on_the_model_page(listed, key_client, session_client):
    publisher, _listing, version = listed
    buyer = OrganizationFactory(slug="buyer")
    member = key_client(publisher.organization, Role.DEVELOPER)
    answer = member.post(
        "/api/v1/private-offers",
        {"organization": "buyer", "model": version.model.slug, "version": version.version,
         "discount_percent": "20.00"},
        format="json",
    )  # fmt: skip
    assert answer.status_code == 201, answer.json()
    offer = answer.json()
    assert (offer["status"], offer["input_per_million"]) == ("proposed", "0.400000")
    assert member.post(f"/api/v1/private-offers/{offer['id']}/approve").status_code == 403
    operator = APIClient()
    operator.force_login(UserFactory(is_staff=True))
    approved = operator.post(f"/api/v1/private-offers/{offer['id']}/approve")
    assert approved.json()["status"] == "approved"
    # The customer sees its offer; another tenant does not.
    customer = key_client(buyer, Role.VIEWER)
    assert [o["id"] for o in customer.get("/api/v1/private-offers").json()] == [offer["id"]]
    assert key_client(OrganizationFactory(), Role.OWNER).get("/api/v1/private-offers").json() == []

    browser, _user = session_client(buyer, Role.VIEWER)
    page = browser.get(f"/models/{version.model.slug}/").content.decode()
    assert "Your price" in page and "$0.40" in page and "20 % off" in page
    elsewhere, _user = session_client(OrganizationFactory(), Role.VIEWER)
    assert "Your price" not in elsewhere.get(f"/models/{version.model.slug}/").content.decode()
    assert PrivateOffer.objects.count() == 1


def test_a_committed_spend_invoices_the_shortfall_and_the_publisher_shares_it(
    listed, operator_actor
):
    _publisher, _listing, version = listed
    current = period_containing(timezone.now())
    following = period_starting(current.end)
    buyer, idle = OrganizationFactory(), OrganizationFactory()
    for organization, commitment in ((buyer, "10.00"), (idle, "5.00")):
        private_offer_create(
            actor=operator_actor,
            organization=organization,
            version=version,
            input_per_million=Decimal("0.25"),
            output_per_million=Decimal("0.75"),
            committed_monthly_spend=Decimal(commitment),
            starts_at=following.start,
        )
    use(buyer, version, prompt=4_000_000, completion=4_000_000, when=following.start)  # 1 + 3
    usage_events_ingest(now=following.start + timedelta(hours=1))
    billing_period_close(period_start=following.start, now=following.end + timedelta(minutes=1))

    invoice = Invoice.objects.get(organization=buyer)
    assert [(line.kind, line.amount) for line in invoice.lines.all()] == [
        ("input_tokens", Decimal("1.00")),
        ("output_tokens", Decimal("3.00")),
        ("commitment", Decimal("6.00")),
    ]
    assert invoice.subtotal == Decimal("10.00")
    # Committed and unused: invoiced all the same.
    assert Invoice.objects.get(organization=idle).subtotal == Decimal("5.00")
    statement = PublisherStatement.objects.get(period_start=following.start)
    assert (statement.revenue, statement.share) == (Decimal("15.00"), Decimal("4.50"))
    assert reconcile_period(following, check_stripe=False).differences == []


def test_a_commitment_for_part_of_a_period_is_prorated(listed, operator_actor):
    """An offer that starts halfway through a period commits half the monthly amount for it;
    one withdrawn a quarter into the next period commits a quarter there; reconcile agrees."""
    _publisher, _listing, version = listed
    following = period_starting(period_containing(timezone.now()).end)
    after = period_starting(following.end)
    half = following.start + (following.end - following.start) / 2
    buyer = OrganizationFactory()
    offer = private_offer_create(
        actor=operator_actor,
        organization=buyer,
        version=version,
        input_per_million=Decimal("0.25"),
        output_per_million=Decimal("0.75"),
        committed_monthly_spend=Decimal("10.00"),
        starts_at=half,
    )
    use(buyer, version, prompt=4_000_000, completion=0, when=half)  # 1.00 at the offer
    usage_events_ingest(now=half + timedelta(hours=1))
    billing_period_close(period_start=following.start, now=following.end + timedelta(minutes=1))
    invoice = Invoice.objects.get(organization=buyer, period_start=following.start)
    lines = [(line.kind, line.amount, line.description) for line in invoice.lines.all()]
    assert [(kind, amount) for kind, amount, _ in lines] == [
        ("input_tokens", Decimal("1.00")),
        ("commitment", Decimal("4.00")),
    ]
    assert f"a period (prorated: 5.00 {invoice.currency} this period), shortfall" in lines[1][2]
    assert reconcile_period(following, check_stripe=False).differences == []

    # Ending a quarter into the next period (as a withdrawal then would): a quarter committed.
    quarter = after.start + (after.end - after.start) / 4
    PrivateOffer.objects.filter(pk=offer.pk).update(expires_at=quarter)
    billing_period_close(period_start=after.start, now=after.end + timedelta(minutes=1))
    invoice = Invoice.objects.get(organization=buyer, period_start=after.start)
    assert [(line.kind, line.amount) for line in invoice.lines.all()] == [
        ("commitment", Decimal("2.50"))
    ]
    assert reconcile_period(after, check_stripe=False).differences == []
