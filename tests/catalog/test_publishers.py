"""Publishers through the REST API: an operator makes an organization a publisher; its members
draft listing changes (card, version, price, terms) and submit them; operators review them in a
queue, send them back with comments or approve them (which applies them to the catalog); every
step is audited; customers must accept a publisher's terms before deploying; the acceptances
export names only the customers whose terms say so."""

import csv
import io
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from accounts.roles import Role
from catalog.models import ListingChange, Model, ModelVersion, TermsAcceptance, TokenPrice
from catalog.publishers import customer_label
from deployments.selectors import route_for
from tests.catalog.factories import BuiltinRuntimeFactory, CpuProfileFactory
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

CARD = {
    "display_name": "Acme Chat",
    "hosting": "self_hosted",
    "description": "Acme's chat model.",
    "tasks": ["chat"],
    "languages": ["en", "fr"],
    "license": "Apache-2.0",
    "context_length": 4096,
    "architecture": "dense",
    "total_parameters": 100_000_000,
    "active_parameters": 100_000_000,
}


@pytest.fixture
def operator(db):
    client = APIClient()
    client.force_login(UserFactory(is_staff=True))
    return client


@pytest.fixture
def acme(db, operator):
    organization = OrganizationFactory(slug="acme")
    answer = operator.post(
        "/api/v1/publishers",
        {"organization": "acme", "display_name": "Acme AI"},
        format="json",
    )
    assert answer.status_code == 201, answer.json()
    return organization


@pytest.fixture
def acme_member(acme, key_client):
    return key_client(acme, Role.DEVELOPER)


def propose(client, listing, kind, payload, *, submit=True):
    answer = client.post(
        f"/api/v1/publishers/acme/listings/{listing}/changes",
        {"kind": kind, "payload": payload},
        format="json",
    )
    assert answer.status_code == 201, answer.json()
    change = answer.json()
    if submit:
        answer = client.post(f"/api/v1/listing-changes/{change['id']}/submit", {}, format="json")
        assert answer.status_code == 200, answer.json()
        change = answer.json()
    return change


def approve(operator, change):
    answer = operator.post(f"/api/v1/listing-changes/{change['id']}/approve", {}, format="json")
    assert answer.status_code == 200, answer.json()
    return answer.json()


def test_a_draft_is_not_public_until_an_operator_approves_it(acme, acme_member, operator, api):
    assert (
        acme_member.post(
            "/api/v1/publishers/acme/listings", {"slug": "acme-chat-7b"}, format="json"
        ).status_code
        == 201
    )
    # A price before the card: refused, the model does not exist yet.
    refused = acme_member.post(
        "/api/v1/publishers/acme/listings/acme-chat-7b/changes",
        {"kind": "price", "payload": {"version": "1", "input_per_million": "1"}},
        format="json",
    )
    assert refused.status_code == 409
    draft = propose(acme_member, "acme-chat-7b", "card", CARD, submit=False)
    assert draft["status"] == "draft"
    # Not in the operators' queue yet, and not in the catalog.
    assert operator.get("/api/v1/listing-changes?status=submitted").json() == []
    assert api.get("/api/v1/models/acme-chat-7b").status_code == 404

    submitted = acme_member.post(f"/api/v1/listing-changes/{draft['id']}/submit", {}, format="json")
    assert submitted.json()["status"] == "submitted"
    queue = operator.get("/api/v1/listing-changes?status=submitted").json()
    assert [c["id"] for c in queue] == [draft["id"]] and queue[0]["publisher"] == "acme"

    # The operator sends it back with a comment; the publisher answers, edits and resubmits.
    back = operator.post(
        f"/api/v1/listing-changes/{draft['id']}/request-changes",
        {"comment": "Say which languages it was evaluated in."},
        format="json",
    )
    assert back.json()["status"] == "changes_requested"
    assert back.json()["comments"][0]["by_operator"] is True
    assert (
        acme_member.post(
            f"/api/v1/listing-changes/{draft['id']}/comments",
            {"body": "English and French, see the card."},
            format="json",
        ).status_code
        == 201
    )
    edited = acme_member.patch(
        f"/api/v1/listing-changes/{draft['id']}",
        {"payload": {**CARD, "description": "Evaluated in English and French."}},
        format="json",
    )
    assert edited.json()["status"] == "draft"
    acme_member.post(f"/api/v1/listing-changes/{draft['id']}/submit", {}, format="json")
    approved = approve(operator, draft)
    assert approved["status"] == "approved" and len(approved["comments"]) == 2

    model = Model.objects.get(slug="acme-chat-7b")
    assert model.publisher == "Acme AI" and "French" in model.description
    assert model.listing.publisher.organization == acme
    # An approved change is final: no edits, and approving twice changes nothing.
    assert (
        acme_member.patch(
            f"/api/v1/listing-changes/{draft['id']}", {"payload": CARD}, format="json"
        ).status_code
        == 409
    )
    assert approve(operator, draft)["status"] == "approved"

    # Every step is in the publisher's audit log, with who did it.
    actions = list(
        AuditLogEntry.objects.filter(organization=acme)
        .order_by("created_at", "id")
        .values_list("action", flat=True)
    )
    for action in (
        "publisher.create",
        "publisher.listing.create",
        "publisher.change.create",
        "publisher.change.submit",
        "publisher.change.request_changes",
        "publisher.change.comment",
        "publisher.change.update",
        "publisher.change.approve",
    ):
        assert action in actions
    assert "catalog.model.create" in AuditLogEntry.objects.values_list("action", flat=True)


def test_who_may_do_what(acme, acme_member, key_client, operator, api, organization):
    # Another organization sees no publisher (404, not 403), may not list under it.
    assert api.get("/api/v1/publishers/acme").status_code == 404
    assert (
        api.post("/api/v1/publishers/acme/listings", {"slug": "x-model"}, format="json").status_code
        == 404
    )
    assert api.get("/api/v1/publishers").json() == []
    # Only operators make publishers and approve.
    assert (
        api.post(
            "/api/v1/publishers",
            {"organization": organization.slug, "display_name": "Me"},
            format="json",
        ).status_code
        == 403
    )
    # A viewer of the publisher reads but does not write.
    viewer = key_client(acme, Role.VIEWER)
    assert viewer.get("/api/v1/publishers/acme/listings").status_code == 200
    assert (
        viewer.post(
            "/api/v1/publishers/acme/listings", {"slug": "x-model"}, format="json"
        ).status_code
        == 403
    )
    acme_member.post("/api/v1/publishers/acme/listings", {"slug": "acme-x"}, format="json")
    change = propose(acme_member, "acme-x", "card", CARD)
    assert (
        acme_member.post(
            f"/api/v1/listing-changes/{change['id']}/approve", {}, format="json"
        ).status_code
        == 403
    )
    # Another tenant cannot see or touch the change.
    assert api.get(f"/api/v1/listing-changes/{change['id']}").status_code == 404
    assert (
        api.post(f"/api/v1/listing-changes/{change['id']}/withdraw", {}, format="json").status_code
        == 404
    )
    # Bad input: unknown payload fields, a float price, a taken slug.
    bad = acme_member.post(
        "/api/v1/publishers/acme/listings/acme-x/changes",
        {"kind": "card", "payload": {"publisher": "Someone else"}},
        format="json",
    )
    assert bad.status_code == 400 and "publisher" in bad.json()["detail"]
    approve(operator, change)
    bad = acme_member.post(
        "/api/v1/publishers/acme/listings/acme-x/changes",
        {"kind": "price", "payload": {"version": "1", "input_per_million": 0.1,
                                      "output_per_million": "1"}},
        format="json",
    )  # fmt: skip
    assert bad.status_code == 400 and "decimal string" in bad.json()["detail"]
    assert (
        acme_member.post(
            "/api/v1/publishers/acme/listings", {"slug": "acme-x"}, format="json"
        ).status_code
        == 409
    )


def test_versions_prices_and_terms_of_a_self_hosted_listing(
    acme, acme_member, operator, key_client, settings
):
    BuiltinRuntimeFactory()
    CpuProfileFactory(name="cpu-small")
    acme_member.post("/api/v1/publishers/acme/listings", {"slug": "acme-chat-7b"}, format="json")
    approve(operator, propose(acme_member, "acme-chat-7b", "card", CARD))
    approve(
        operator,
        propose(
            acme_member,
            "acme-chat-7b",
            "version",
            {"version": "1.0", "serving_runtime": "builtin", "runtime_args": {}},
        ),
    )
    version = ModelVersion.objects.get(model__slug="acme-chat-7b", version="1.0")
    # Self-hosted: a draft until the operator imported the weights and publishes it.
    assert version.status == ModelVersion.Status.DRAFT
    assert (
        operator.post(
            "/api/v1/models/acme-chat-7b/versions/1.0/publish", {}, format="json"
        ).status_code
        == 200
    )
    approve(
        operator,
        propose(
            acme_member,
            "acme-chat-7b",
            "price",
            {"version": "1.0", "input_per_million": "0.25", "output_per_million": "0.75"},
        ),
    )
    approve(
        operator,
        propose(
            acme_member,
            "acme-chat-7b",
            "price",
            {"version": "1.0", "hardware_profile": "cpu-small", "per_hour": "0.40"},
        ),
    )
    price = TokenPrice.objects.get(model_version=version)
    assert (str(price.input_per_million), str(price.output_per_million)) == ("0.250000", "0.750000")
    approve(
        operator,
        propose(
            acme_member,
            "acme-chat-7b",
            "terms",
            {
                "version": "1.0",
                "terms_version": "2026-01",
                "title": "Acme acceptable use",
                "body": "Do not use Acme Chat to write spam.",
            },
        ),
    )

    # A customer is refused until it accepted the terms in force, and a new version asks again.
    customer = OrganizationFactory(slug="buyer")
    client = key_client(customer, Role.ADMIN)
    body = {"name": "chat", "model": "acme-chat-7b", "type": "dedicated",
            "hardware_profile": "cpu-small", "min_replicas": 1}  # fmt: skip
    refused = client.post("/api/v1/deployments", body, format="json")
    assert refused.status_code == 403 and refused.json()["code"] == "terms_not_accepted"
    accepted = client.post(
        "/api/v1/models/acme-chat-7b/versions/1.0/terms/accept",
        {"version": "2026-01"},
        format="json",
    )
    assert accepted.status_code == 201
    created = client.post("/api/v1/deployments", body, format="json")
    assert created.status_code == 201, created.json()
    from deployments.models import Deployment

    Deployment.objects.filter(name="chat").update(status=Deployment.Status.READY)
    assert route_for(organization_id=customer.pk, model="chat").terms_pending is None

    approve(
        operator,
        propose(
            acme_member,
            "acme-chat-7b",
            "terms",
            {
                "version": "1.0",
                "terms_version": "2026-02",
                "title": "Acme acceptable use",
                "body": "Do not use Acme Chat to write spam, or phishing.",
                "customers_named": True,
            },
        ),
    )
    route = route_for(organization_id=customer.pk, model="chat")
    assert route.terms_pending == "2026-02"
    assert route.terms_accept_path == "/api/v1/models/acme-chat-7b/versions/1.0/terms/accept"

    # The export: the first acceptance did not agree to be named, so it is a pseudonym.
    other = OrganizationFactory(slug="quiet")
    key_client(other, Role.ADMIN).post(
        "/api/v1/models/acme-chat-7b/versions/1.0/terms/accept",
        {"version": "2026-02"},
        format="json",
    )
    client.post(
        "/api/v1/models/acme-chat-7b/versions/1.0/terms/accept",
        {"version": "2026-02"},
        format="json",
    )
    assert TermsAcceptance.objects.count() == 3
    csv_text = acme_member.get("/api/v1/publishers/acme/terms-acceptances?format=csv")
    assert csv_text["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(csv_text.content.decode())))
    publisher = acme.publisher
    pseudonym = customer_label(
        publisher=publisher, organization_id=customer.pk, slug="buyer", named=False
    )
    assert [(r["terms_version"], r["customer"]) for r in rows] == [
        ("2026-01", pseudonym),
        ("2026-02", "quiet"),
        ("2026-02", "buyer"),
    ]
    assert rows[0]["accepted_by"] == ""
    # Operators see every name.
    names = [
        r["customer"] for r in operator.get("/api/v1/publishers/acme/terms-acceptances").json()
    ]
    assert names == ["buyer", "quiet", "buyer"]
    # Another tenant cannot export it.
    assert client.get("/api/v1/publishers/acme/terms-acceptances").status_code == 404


def test_a_price_start_that_passed_during_review_starts_at_approval(acme, acme_member, operator):
    BuiltinRuntimeFactory()
    acme_member.post("/api/v1/publishers/acme/listings", {"slug": "acme-chat-7b"}, format="json")
    approve(operator, propose(acme_member, "acme-chat-7b", "card", CARD))
    approve(
        operator,
        propose(acme_member, "acme-chat-7b", "version", {"version": "1.0",
                                                         "serving_runtime": "builtin"}),
    )  # fmt: skip
    soon = timezone.now() + timedelta(seconds=1)
    change = propose(
        acme_member,
        "acme-chat-7b",
        "price",
        {"version": "1.0", "input_per_million": "1", "output_per_million": "2",
         "effective_from": soon.isoformat()},
    )  # fmt: skip
    ListingChange.objects.filter(pk=change["id"]).update(
        payload={**change["payload"], "effective_from": (soon - timedelta(days=3)).isoformat()}
    )
    before = timezone.now()
    approve(operator, change)
    assert TokenPrice.objects.get().effective_from >= before


def test_a_partner_hosted_listing_is_published_with_its_provider_model(acme, acme_member, operator):
    acme_member.post("/api/v1/publishers/acme/listings", {"slug": "acme-large"}, format="json")
    approve(operator, propose(acme_member, "acme-large", "card", {**CARD, "hosting": "partner"}))
    # Without the provider's model id the operator cannot approve it: it stays in the queue.
    incomplete = propose(acme_member, "acme-large", "version", {"version": "1"})
    refused = operator.post(
        f"/api/v1/listing-changes/{incomplete['id']}/approve", {}, format="json"
    )
    assert refused.status_code == 400 and "provider_model_id" in refused.json()["detail"]
    assert ListingChange.objects.get(pk=incomplete["id"]).status == "submitted"
    assert not ModelVersion.objects.filter(model__slug="acme-large").exists()
    approve(
        operator,
        propose(
            acme_member,
            "acme-large",
            "version",
            {"version": "2", "provider_model_id": "acme-large-2", "provider_kind": "mistral"},
        ),
    )
    version = ModelVersion.objects.get(model__slug="acme-large", version="2")
    assert version.status == ModelVersion.Status.PUBLISHED
    assert version.provider_model.provider_model_id == "acme-large-2"
    assert version.provider_model.needs_connection  # until an operator picks a connection
