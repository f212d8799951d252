"""Publishers: organizations that list models in the catalog and are paid a share of them.

A publisher's members (role with `listings.write`) propose changes to their listings — the
model card, a new version, a token price, terms of use — as drafts; they submit a draft for
review; an operator approves it, which applies it to the catalog through the catalog's own
services (model_create, model_version_create, token_price_set, terms_publish: the same checks
as an operator's direct change), or asks for changes with a comment. Nothing a publisher writes
is public before an operator approved it. Every write here is audited with its actor, in the
publisher's organization's log.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal, InvalidOperation

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from accounts.actors import Actor
from accounts.models import Organization
from accounts.roles import Permission
from accounts.services import audit_record, require
from catalog import services
from catalog.models import (
    Listing,
    ListingChange,
    Model,
    ModelVersion,
    Publisher,
    ReviewComment,
    TermsAcceptance,
)
from catalog.permissions import is_operator, require_operator
from controlplane.errors import Conflict, NotFound, ValidationFailed

# What a publisher may propose for its model card: everything an operator sets but who
# publishes it (the publisher's own name, always) and its visibility (public once approved).
CARD_FIELDS = services.MODEL_FIELDS - {"publisher"}
_VERSION_EXTRA = {"version", "provider_model_id", "provider_kind"}
_PAYLOAD_FIELDS = {
    ListingChange.Kind.CARD: (set(), CARD_FIELDS),
    ListingChange.Kind.VERSION: ({"version"}, services.VERSION_FIELDS | _VERSION_EXTRA),
    # A token price (input_per_million, output_per_million) or a dedicated one on a hardware
    # profile (hardware_profile, per_hour).
    ListingChange.Kind.PRICE: (
        {"version"},
        {
            "version",
            "input_per_million",
            "output_per_million",
            "hardware_profile",
            "per_hour",
            "currency",
            "effective_from",
        },
    ),
    ListingChange.Kind.TERMS: (
        {"version", "terms_version", "title", "body"},
        {
            "version",
            "terms_version",
            "title",
            "body",
            "url",
            "customers_named",
            "effective_from",
        },
    ),
}
_EDITABLE = (ListingChange.Status.DRAFT, ListingChange.Status.CHANGES_REQUESTED)


def _audit(actor: Actor, action: str, target, publisher: Publisher, changes=None) -> None:
    audit_record(
        actor=actor,
        action=action,
        target=target,
        changes=services._jsonable(changes or {}),
        organization=publisher.organization,
    )


def require_publisher_member(actor: Actor, publisher: Publisher, *, write: bool = False) -> None:
    """Operators, and members of the publisher's organization (writes: `listings.write`)."""
    if is_operator(actor):
        return
    if actor.organization is None or actor.organization.pk != publisher.organization_id:
        raise NotFound("No such publisher.")
    if write:
        require(actor, Permission.LISTINGS_WRITE)


# --- publishers and listings -----------------------------------------------------------------


@transaction.atomic
def publisher_create(*, actor: Actor, organization: Organization, display_name: str) -> Publisher:
    """Make an organization a publisher (operators)."""
    require_operator(actor)
    if Publisher.objects.filter(organization=organization).exists():
        raise Conflict(f"{organization.slug} is a publisher already.", field="organization")
    display_name = display_name.strip()
    if not display_name:
        raise ValidationFailed("Give the publisher's display name.", field="display_name")
    publisher = Publisher.objects.create(organization=organization, display_name=display_name)
    _audit(actor, "publisher.create", publisher, publisher, {"display_name": display_name})
    return publisher


def publisher_list(*, actor: Actor) -> QuerySet[Publisher]:
    publishers = Publisher.objects.select_related("organization")
    if is_operator(actor):
        return publishers
    return publishers.filter(organization=actor.organization)


def publisher_by_slug(*, actor: Actor, slug: str) -> Publisher:
    publisher = publisher_list(actor=actor).filter(organization__slug=slug).first()
    if publisher is None:
        raise NotFound(f"No publisher {slug!r}.")
    return publisher


@transaction.atomic
def listing_create(*, actor: Actor, publisher: Publisher, slug: str) -> Listing:
    """A new listing: the slug its model will have. Its card is proposed as a change."""
    require_publisher_member(actor, publisher, write=True)
    listing = Listing(publisher=publisher, slug=slug)
    try:
        listing.full_clean(exclude=["publisher", "model"])
    except Exception as error:  # ValidationError
        messages = getattr(error, "message_dict", {"slug": [str(error)]})
        field, texts = next(iter(messages.items()))
        if "already exists" in texts[0]:
            raise Conflict(f"A listing {slug!r} exists already.", field="slug") from None
        raise ValidationFailed(texts[0], field=field) from None
    if Model.objects.filter(slug=slug).exists():
        raise Conflict(f"The catalog has a model {slug!r} already.", field="slug")
    listing.save()
    _audit(actor, "publisher.listing.create", listing, publisher, {"slug": slug})
    return listing


def listing_by_slug(*, publisher: Publisher, slug: str) -> Listing:
    listing = publisher.listings.select_related("model").filter(slug=slug).first()
    if listing is None:
        raise NotFound(f"No listing {slug!r}.")
    return listing


# --- proposed changes and their review -------------------------------------------------------


def _check_payload(kind: str, payload) -> dict:
    if not isinstance(payload, dict):
        raise ValidationFailed("payload must be an object.", field="payload")
    required, allowed = _PAYLOAD_FIELDS[kind]
    unknown = set(payload) - allowed
    if unknown:
        name = sorted(unknown)[0]
        raise ValidationFailed(
            f"{name} is not something a {kind} change sets (known: {', '.join(sorted(allowed))}).",
            field=f"payload.{name}",
        )
    missing = required - set(payload)
    if missing:
        name = sorted(missing)[0]
        raise ValidationFailed(f"A {kind} change needs {name}.", field=f"payload.{name}")
    if kind == ListingChange.Kind.PRICE:
        for name in _price_form(payload)[1:]:
            if name != "hardware_profile":
                _decimal(payload[name], field=f"payload.{name}")
    if "effective_from" in payload:
        _moment(payload["effective_from"])
    return payload


def _price_form(payload: dict) -> tuple[str, ...]:
    token = ("tokens", "input_per_million", "output_per_million")
    dedicated = ("dedicated", "hardware_profile", "per_hour")
    for form in (token, dedicated):
        if set(form[1:]) <= set(payload) and not set(payload) & set((token + dedicated)[1:]) - set(
            form[1:]
        ):
            return form
    raise ValidationFailed(
        "A price is either input_per_million and output_per_million (per token), or "
        "hardware_profile and per_hour (dedicated).",
        field="payload",
    )


def _decimal(value, *, field: str) -> Decimal:
    # Money arrives as a string ("0.25"); a JSON float would already have lost digits.
    if not isinstance(value, str):
        raise ValidationFailed(f'{field} must be a decimal string such as "0.25".', field=field)
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValidationFailed(f"{field} is not a decimal number.", field=field) from None
    if not amount.is_finite() or amount < 0:
        raise ValidationFailed(f"{field} must be zero or more.", field=field)
    return amount


def _moment(value) -> datetime:
    moment = parse_datetime(value) if isinstance(value, str) else None
    if moment is None or timezone.is_naive(moment):
        raise ValidationFailed(
            "effective_from must be an ISO 8601 time with a time zone.",
            field="payload.effective_from",
        )
    return moment


@transaction.atomic
def listing_change_create(
    *, actor: Actor, listing: Listing, kind: str, payload: dict
) -> ListingChange:
    """A draft change of a listing, by a member of its publisher."""
    require_publisher_member(actor, listing.publisher, write=True)
    if kind not in ListingChange.Kind.values:
        raise ValidationFailed(
            f"kind must be one of {', '.join(ListingChange.Kind.values)}.", field="kind"
        )
    if kind != ListingChange.Kind.CARD and listing.model_id is None:
        raise Conflict(
            f"{listing.slug} has no approved model card yet: propose the card first.",
            field="kind",
        )
    change = ListingChange.objects.create(
        listing=listing,
        kind=kind,
        payload=_check_payload(kind, payload),
        created_by_label=actor.label[:200],
    )
    _audit(actor, "publisher.change.create", change, listing.publisher, {"kind": kind})
    return change


def _locked(change: ListingChange) -> ListingChange:
    # Only the change's row is locked (of=self): the listing's model is an outer join.
    return (
        ListingChange.objects.select_for_update(of=("self",))
        .select_related("listing__publisher__organization", "listing__model")
        .get(pk=change.pk)
    )


@transaction.atomic
def listing_change_update(*, actor: Actor, change: ListingChange, payload: dict) -> ListingChange:
    """Edit a draft (or a change an operator sent back: it becomes a draft again)."""
    change = _locked(change)
    publisher = change.listing.publisher
    require_publisher_member(actor, publisher, write=True)
    if change.status not in _EDITABLE:
        raise Conflict(f"This change is {change.get_status_display().lower()}; it cannot change.")
    old = change.payload
    change.payload = _check_payload(change.kind, payload)
    change.status = ListingChange.Status.DRAFT
    change.save(update_fields=["payload", "status", "updated_at"])
    _audit(actor, "publisher.change.update", change, publisher, {"payload": [old, change.payload]})
    return change


@transaction.atomic
def listing_change_submit(*, actor: Actor, change: ListingChange) -> ListingChange:
    """Put a draft in the operators' review queue."""
    change = _locked(change)
    publisher = change.listing.publisher
    require_publisher_member(actor, publisher, write=True)
    if change.status == ListingChange.Status.SUBMITTED:
        return change
    if change.status not in _EDITABLE:
        raise Conflict(f"This change is {change.get_status_display().lower()}.")
    change.status = ListingChange.Status.SUBMITTED
    change.submitted_at = timezone.now()
    change.save(update_fields=["status", "submitted_at", "updated_at"])
    _audit(actor, "publisher.change.submit", change, publisher)
    return change


@transaction.atomic
def listing_change_withdraw(*, actor: Actor, change: ListingChange) -> ListingChange:
    change = _locked(change)
    publisher = change.listing.publisher
    require_publisher_member(actor, publisher, write=True)
    if change.status == ListingChange.Status.APPROVED:
        raise Conflict("This change is approved and applied; propose another one instead.")
    change.status = ListingChange.Status.WITHDRAWN
    change.save(update_fields=["status", "updated_at"])
    _audit(actor, "publisher.change.withdraw", change, publisher)
    return change


@transaction.atomic
def review_comment_add(
    *, actor: Actor, change: ListingChange, body: str, audit: bool = True
) -> ReviewComment:
    """A comment in a change's review thread, by its publisher or an operator."""
    publisher = change.listing.publisher
    require_publisher_member(actor, publisher, write=not is_operator(actor))
    if not body.strip():
        raise ValidationFailed("The comment is empty.", field="body")
    comment = ReviewComment.objects.create(
        change=change,
        author_label=actor.label[:200],
        by_operator=is_operator(actor),
        body=body.strip(),
    )
    if audit:
        _audit(actor, "publisher.change.comment", change, publisher, {"comment": comment.pk})
    return comment


@transaction.atomic
def listing_change_request_changes(
    *, actor: Actor, change: ListingChange, comment: str
) -> ListingChange:
    """Send a submitted change back to its publisher, saying why (operators)."""
    require_operator(actor)
    change = _locked(change)
    if change.status != ListingChange.Status.SUBMITTED:
        raise Conflict("Only a submitted change can be sent back.")
    if not comment.strip():
        raise ValidationFailed("Say what to change.", field="comment")
    review_comment_add(actor=actor, change=change, body=comment, audit=False)
    change.status = ListingChange.Status.CHANGES_REQUESTED
    change.reviewed_at = timezone.now()
    change.reviewed_by_label = actor.label[:200]
    change.save(update_fields=["status", "reviewed_at", "reviewed_by_label", "updated_at"])
    _audit(
        actor,
        "publisher.change.request_changes",
        change,
        change.listing.publisher,
        {"comment": comment},
    )
    return change


@transaction.atomic
def listing_change_approve(
    *, actor: Actor, change: ListingChange, comment: str = ""
) -> ListingChange:
    """Apply a submitted change to the catalog, as the approving operator (operators). A
    change the catalog refuses (a slug taken meanwhile, a bad price) is refused as a whole."""
    require_operator(actor)
    change = _locked(change)
    if change.status == ListingChange.Status.APPROVED:
        return change
    if change.status != ListingChange.Status.SUBMITTED:
        raise Conflict("Only a submitted change can be approved.")
    applied = _APPLY[change.kind](actor, change.listing, dict(change.payload))
    if comment.strip():
        review_comment_add(actor=actor, change=change, body=comment, audit=False)
    change.status = ListingChange.Status.APPROVED
    change.reviewed_at = timezone.now()
    change.reviewed_by_label = actor.label[:200]
    change.save(update_fields=["status", "reviewed_at", "reviewed_by_label", "updated_at"])
    _audit(
        actor,
        "publisher.change.approve",
        change,
        change.listing.publisher,
        {"kind": change.kind, "applied": str(applied)},
    )
    return change


def _version_of(listing: Listing, name) -> ModelVersion:
    version = ModelVersion.objects.filter(model=listing.model, version=str(name)).first()
    if version is None:
        raise ValidationFailed(f"{listing.slug} has no version {name!r}.", field="payload.version")
    return version


def _apply_card(actor: Actor, listing: Listing, payload: dict):
    payload["publisher"] = listing.publisher.display_name
    if listing.model_id is None:
        model = services.model_create(actor=actor, slug=listing.slug, **payload)
        listing.model = model
        listing.save(update_fields=["model"])
        return model
    return services.model_update(actor=actor, model=listing.model, **payload)


def _apply_version(actor: Actor, listing: Listing, payload: dict):
    """A new version; a partner-hosted one is mapped to its provider model and published
    (nothing to import), a self-hosted one stays a draft until the operator has imported its
    weights and publishes it."""
    from catalog import providers

    provider_model_id = payload.pop("provider_model_id", None)
    provider_kind = payload.pop("provider_kind", None)
    version = services.model_version_create(actor=actor, model=listing.model, **payload)
    if listing.model.is_partner:
        if not provider_model_id:
            raise ValidationFailed(
                "A partner-hosted version needs provider_model_id.",
                field="payload.provider_model_id",
            )
        providers.provider_model_set(
            actor=actor, version=version, provider_model_id=provider_model_id, kind=provider_kind
        )
        services.model_version_publish(actor=actor, version=version)
    return version


def _apply_price(actor: Actor, listing: Listing, payload: dict):
    effective_from = None
    if "effective_from" in payload:
        # A start that passed while the change waited for review starts now instead.
        effective_from = max(_moment(payload["effective_from"]), timezone.now())
    version = _version_of(listing, payload["version"])
    if _price_form(payload)[0] == "dedicated":
        from catalog.models import HardwareProfile

        profile = HardwareProfile.objects.filter(name=str(payload["hardware_profile"])).first()
        if profile is None:
            raise ValidationFailed(
                f"No hardware profile {payload['hardware_profile']!r}.",
                field="payload.hardware_profile",
            )
        return services.dedicated_price_set(
            actor=actor,
            version=version,
            profile=profile,
            per_hour=_decimal(payload["per_hour"], field="per_hour"),
            currency=payload.get("currency", "USD"),
            effective_from=effective_from,
        )
    return services.token_price_set(
        actor=actor,
        version=version,
        input_per_million=_decimal(payload["input_per_million"], field="input_per_million"),
        output_per_million=_decimal(payload["output_per_million"], field="output_per_million"),
        currency=payload.get("currency", "USD"),
        effective_from=effective_from,
    )


def _apply_terms(actor: Actor, listing: Listing, payload: dict):
    from catalog.terms import terms_publish

    effective_from = None
    if "effective_from" in payload:
        effective_from = max(_moment(payload["effective_from"]), timezone.now())
    return terms_publish(
        actor=actor,
        version=_version_of(listing, payload["version"]),
        terms_version=str(payload["terms_version"]),
        title=str(payload["title"]),
        body=str(payload["body"]),
        url=str(payload.get("url", "")),
        customers_named=bool(payload.get("customers_named", False)),
        effective_from=effective_from,
    )


_APPLY = {
    ListingChange.Kind.CARD: _apply_card,
    ListingChange.Kind.VERSION: _apply_version,
    ListingChange.Kind.PRICE: _apply_price,
    ListingChange.Kind.TERMS: _apply_terms,
}


def listing_change_list(
    *, actor: Actor, publisher: Publisher | None = None, status: str | None = None
) -> QuerySet[ListingChange]:
    """Changes an actor may see: an operator's review queue (every publisher), or one
    publisher's own. Oldest submission first, as a queue is read."""
    changes = ListingChange.objects.select_related("listing__publisher__organization")
    if publisher is not None:
        require_publisher_member(actor, publisher)
        changes = changes.filter(listing__publisher=publisher)
    elif not is_operator(actor):
        changes = changes.filter(listing__publisher__organization=actor.organization)
    if status:
        changes = changes.filter(status=status)
    return changes.order_by("submitted_at", "created_at", "id")


def listing_change_get(*, actor: Actor, change_id: int) -> ListingChange:
    change = listing_change_list(actor=actor).filter(pk=change_id).first()
    if change is None:
        raise NotFound("No such change.")
    return change


# --- terms acceptances, as a publisher sees them ---------------------------------------------


def customer_label(*, publisher: Publisher, organization_id: int, slug: str, named: bool) -> str:
    """How a publisher sees a customer organization: its slug when the customer accepted terms
    that name it, else a pseudonym stable per publisher (it cannot be joined across
    publishers or guessed from the organization's id)."""
    if named:
        return slug
    digest = hashlib.sha256(f"{publisher.uid}:{organization_id}".encode()).hexdigest()
    return f"customer-{digest[:10]}"


def terms_acceptance_rows(*, actor: Actor, publisher: Publisher) -> list[dict]:
    """Every acceptance of the publisher's terms, oldest first, for its export: operators see
    the organizations; the publisher sees them where the terms name customers."""
    require_publisher_member(actor, publisher)
    operator = is_operator(actor)
    rows = []
    for acceptance in (
        TermsAcceptance.objects.filter(terms__model_version__model__listing__publisher=publisher)
        .select_related("terms__model_version__model", "organization")
        .order_by("accepted_at", "id")
    ):
        terms = acceptance.terms
        named = operator or terms.customers_named
        rows.append(
            {
                "model": terms.model_version.model.slug,
                "model_version": terms.model_version.version,
                "terms_version": terms.version,
                "customer": customer_label(
                    publisher=publisher,
                    organization_id=acceptance.organization_id,
                    slug=acceptance.organization.slug,
                    named=named,
                ),
                "accepted_by": acceptance.accepted_by_label if named else "",
                "accepted_at": acceptance.accepted_at.isoformat(),
            }
        )
    return rows
