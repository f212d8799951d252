"""Private offers: one customer organization's own price for a model version.

An operator makes an offer for any model (approved as made); a publisher's members propose one
for their own models, which an operator approves. The offer is a rate per million tokens —
given as such, or as a discount off the list price in force at its start, turned into a rate
then (rounded half-up to the six places prices have), optionally with a committed spend per
billing period (the invoice adds the shortfall: billing.invoicing) — from `starts_at` (never in the past:
usage already rated keeps its price) until `expires_at`. Two approved offers of one
organization and version never overlap, so rating finds at most one. Every write is audited
in the customer's log and, for a publisher's offer, the publisher's.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import Organization
from accounts.roles import Permission
from accounts.services import audit_record, require
from catalog.models import ModelVersion, PrivateOffer, TokenPrice
from catalog.permissions import is_operator, require_operator
from catalog.services import PRICE_BACKDATE_GRACE
from controlplane.errors import Conflict, NotFound, ValidationFailed

_PRICE_PLACES = Decimal("0.000001")


def _list_price_at(version: ModelVersion, moment: datetime) -> TokenPrice | None:
    return (
        TokenPrice.objects.filter(model_version=version, effective_from__lte=moment)
        .order_by("-effective_from", "-id")
        .first()
    )


def _check_start(starts_at: datetime | None) -> datetime:
    now = timezone.now()
    if starts_at is None:
        return now
    if timezone.is_naive(starts_at):
        raise ValidationFailed("Give starts_at with a time zone.", field="starts_at")
    if starts_at < now - PRICE_BACKDATE_GRACE:
        raise ValidationFailed(
            "starts_at is in the past: usage already rated would change. Give a time from now on.",
            field="starts_at",
        )
    return starts_at


def _publisher_of(actor: Actor, version: ModelVersion):
    """The actor's publisher when the version is one of its models (else a 404)."""
    listing = getattr(version.model, "listing", None)
    if (
        listing is None
        or actor.organization is None
        or listing.publisher.organization_id != actor.organization.pk
    ):
        raise NotFound("No such model among your publisher's listings.")
    require(actor, Permission.LISTINGS_WRITE)
    return listing.publisher


@transaction.atomic
def private_offer_create(
    *,
    actor: Actor,
    organization: Organization,
    version: ModelVersion,
    input_per_million: Decimal | None = None,
    output_per_million: Decimal | None = None,
    discount_percent: Decimal | None = None,
    committed_monthly_spend: Decimal | None = None,
    starts_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> PrivateOffer:
    """An offer to `organization` for `version`: a rate (input and output per million) or a
    discount in percent off the list price in force at its start; with a commitment, the
    least the customer pays for the model in each billing period the offer covers whole."""
    operator = is_operator(actor)
    publisher = None if operator else _publisher_of(actor, version)
    starts_at = _check_start(starts_at)
    if expires_at is not None and (timezone.is_naive(expires_at) or expires_at <= starts_at):
        raise ValidationFailed("expires_at must come after starts_at.", field="expires_at")
    list_price = _list_price_at(version, starts_at)
    if list_price is None:
        raise ValidationFailed(
            f"{version} has no list price at {starts_at.isoformat()}: an offer replaces one.",
            field="model",
        )
    if list_price.currency != organization.currency:
        raise ValidationFailed(
            f"The list price is in {list_price.currency}; {organization.slug} pays in "
            f"{organization.currency}.",
            field="organization",
        )
    given_rate = input_per_million is not None or output_per_million is not None
    if given_rate == (discount_percent is not None):
        raise ValidationFailed(
            "Give either input_per_million and output_per_million, or discount_percent.",
            field="discount_percent",
        )
    if discount_percent is not None:
        if not Decimal(0) < discount_percent <= Decimal(100):
            raise ValidationFailed(
                "discount_percent is more than 0 and at most 100.", field="discount_percent"
            )
        keep = (Decimal(100) - discount_percent) / Decimal(100)
        input_per_million = (list_price.input_per_million * keep).quantize(
            _PRICE_PLACES, ROUND_HALF_UP
        )
        output_per_million = (list_price.output_per_million * keep).quantize(
            _PRICE_PLACES, ROUND_HALF_UP
        )
    for name, value in (
        ("input_per_million", input_per_million),
        ("output_per_million", output_per_million),
    ):
        if not isinstance(value, Decimal) or value < 0:
            raise ValidationFailed(f"{name} is a Decimal of 0 or more.", field=name)
        if value != value.quantize(_PRICE_PLACES):
            raise ValidationFailed(f"{name} has at most six decimal places.", field=name)
    if committed_monthly_spend is not None and (
        committed_monthly_spend < 0
        or committed_monthly_spend != committed_monthly_spend.quantize(Decimal("0.01"))
    ):
        raise ValidationFailed(
            "committed_monthly_spend is an amount of 0 or more, in cents.",
            field="committed_monthly_spend",
        )
    offer = PrivateOffer(
        organization=organization,
        committed_monthly_spend=committed_monthly_spend,
        model_version=version,
        publisher=publisher,
        currency=organization.currency,
        input_per_million=input_per_million,
        output_per_million=output_per_million,
        discount_percent=discount_percent,
        starts_at=starts_at,
        expires_at=expires_at,
        proposed_by_label=actor.label[:200],
    )
    offer.full_clean()
    offer.save()
    _audit(actor, "private_offer.create", offer)
    if operator:
        return private_offer_approve(actor=actor, offer=offer)
    return offer


def _overlapping(offer: PrivateOffer) -> QuerySet[PrivateOffer]:
    others = PrivateOffer.objects.filter(
        organization_id=offer.organization_id,
        model_version_id=offer.model_version_id,
        status=PrivateOffer.Status.APPROVED,
    ).exclude(pk=offer.pk)
    others = others.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=offer.starts_at))
    if offer.expires_at is not None:
        others = others.filter(starts_at__lt=offer.expires_at)
    return others


@transaction.atomic
def private_offer_approve(*, actor: Actor, offer: PrivateOffer) -> PrivateOffer:
    """Put an offer in force from its start (operators). A start that passed while it waited
    becomes now; it may not overlap another approved offer of the same customer and model."""
    require_operator(actor)
    offer = PrivateOffer.objects.select_for_update().get(pk=offer.pk)
    if offer.status == PrivateOffer.Status.APPROVED:
        return offer
    if offer.status != PrivateOffer.Status.PROPOSED:
        raise Conflict(f"This offer is {offer.status}.")
    now = timezone.now()
    offer.starts_at = max(offer.starts_at, now)
    if offer.expires_at is not None and offer.expires_at <= offer.starts_at:
        raise Conflict("This offer expired before it was approved.")
    clash = _overlapping(offer).first()
    if clash is not None:
        raise Conflict(
            f"Offer {clash.pk} is in force for this customer and model then; withdraw it or "
            "start this one when it ends.",
            field="starts_at",
        )
    offer.status = PrivateOffer.Status.APPROVED
    offer.approved_by_label = actor.label[:200]
    offer.approved_at = now
    offer.save(update_fields=["status", "starts_at", "approved_by_label", "approved_at"])
    _audit(actor, "private_offer.approve", offer)
    return offer


@transaction.atomic
def private_offer_withdraw(*, actor: Actor, offer: PrivateOffer) -> PrivateOffer:
    """End an offer now (operators, or its publisher): usage from now on is rated at the list
    price again; what was rated at the offer stays so."""
    if not is_operator(actor):
        if offer.publisher is None:
            raise NotFound("No such offer.")
        _publisher_of(actor, offer.model_version)
    offer = PrivateOffer.objects.select_for_update().get(pk=offer.pk)
    now = timezone.now()
    if offer.status == PrivateOffer.Status.WITHDRAWN:
        return offer
    if offer.status == PrivateOffer.Status.APPROVED and offer.starts_at < now:
        # In force already: it ends now (its past stays as rated).
        if offer.expires_at is None or offer.expires_at > now:
            offer.expires_at = now + timedelta(microseconds=1)
        offer.save(update_fields=["expires_at"])
    else:
        offer.status = PrivateOffer.Status.WITHDRAWN
        offer.save(update_fields=["status"])
    _audit(actor, "private_offer.withdraw", offer)
    return offer


def _audit(actor: Actor, action: str, offer: PrivateOffer) -> None:
    changes = {
        "model_version": str(offer.model_version),
        "input_per_million": str(offer.input_per_million),
        "output_per_million": str(offer.output_per_million),
        "currency": offer.currency,
        "committed_monthly_spend": (
            str(offer.committed_monthly_spend) if offer.committed_monthly_spend else None
        ),
        "starts_at": offer.starts_at.isoformat(),
        "expires_at": offer.expires_at.isoformat() if offer.expires_at else None,
        "status": offer.status,
    }
    audit_record(
        actor=actor, action=action, target=offer, changes=changes, organization=offer.organization
    )
    if offer.publisher is not None:
        audit_record(
            actor=actor,
            action=action,
            target=offer,
            changes=changes,
            organization=offer.publisher.organization,
        )


def private_offer_list(*, actor: Actor) -> QuerySet[PrivateOffer]:
    """Offers an actor may see: operators all; an organization the offers made to it and, for a
    publisher, the ones it proposed."""
    offers = PrivateOffer.objects.select_related(
        "organization", "model_version__model", "publisher__organization"
    )
    if is_operator(actor):
        return offers
    return offers.filter(
        Q(organization=actor.organization) | Q(publisher__organization=actor.organization)
    )


def private_offer_in_force(
    *, organization_id: int, version_id: int, at: datetime | None = None
) -> PrivateOffer | None:
    """The customer's own price for the version at `at` (default now), if it has one."""
    at = at or timezone.now()
    return (
        PrivateOffer.objects.filter(
            organization_id=organization_id,
            model_version_id=version_id,
            status=PrivateOffer.Status.APPROVED,
            starts_at__lte=at,
        )
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .order_by("-starts_at")
        .first()
    )
