"""Terms of use of a model version: versioned documents, and each organization's acceptance of
one version (who, when, which). The terms in force are the newest whose start has come; an
organization may enable or call the version only once it accepted exactly those, so a new
version of the terms asks again. Operators publish terms here; a publisher's terms come through
the same service when an operator approves its proposal (catalog.publishers)."""

from __future__ import annotations

from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.actors import Actor
from accounts.roles import Permission
from accounts.services import require
from catalog.models import ModelVersion, TermsAcceptance, TermsOfUse
from catalog.permissions import require_operator
from catalog.services import _audit
from controlplane.errors import Conflict, ValidationFailed


@transaction.atomic
def terms_publish(
    *,
    actor: Actor,
    version: ModelVersion,
    terms_version: str,
    title: str,
    body: str,
    url: str = "",
    customers_named: bool = False,
    effective_from: datetime | None = None,
) -> TermsOfUse:
    """A new version of a model version's terms, in force from `effective_from` (default
    now); every organization must accept it from then on. Terms are never edited."""
    require_operator(actor)
    if effective_from is not None and timezone.is_naive(effective_from):
        raise ValidationFailed("Give effective_from with a time zone.", field="effective_from")
    if not body.strip():
        raise ValidationFailed("The terms have no text.", field="body")
    terms = TermsOfUse(
        model_version=version,
        version=terms_version,
        title=title,
        body=body,
        url=url,
        customers_named=customers_named,
        effective_from=effective_from or timezone.now(),
    )
    try:
        terms.full_clean()
    except Exception as error:  # ValidationError: one message is enough
        messages = getattr(error, "message_dict", {"version": [str(error)]})
        field, texts = next(iter(messages.items()))
        if field == "__all__":
            raise Conflict(
                f"{version} already has terms version {terms_version!r}.", field="version"
            ) from None
        raise ValidationFailed(texts[0], field=field) from None
    terms.save()
    _audit(
        actor,
        "catalog.terms.publish",
        version,
        {"terms_version": terms_version, "effective_from": terms.effective_from},
    )
    return terms


def terms_in_force(*, version_id: int, at: datetime | None = None) -> TermsOfUse | None:
    return (
        TermsOfUse.objects.filter(
            model_version_id=version_id, effective_from__lte=at or timezone.now()
        )
        .order_by("-effective_from", "-id")
        .first()
    )


def terms_list(*, version_id: int, operator: bool = False) -> QuerySet[TermsOfUse]:
    """A version's terms, newest first; scheduled ones (not in force yet) for operators only."""
    documents = TermsOfUse.objects.filter(model_version_id=version_id)
    if not operator:
        documents = documents.filter(effective_from__lte=timezone.now())
    return documents.order_by("-effective_from", "-id")


def terms_accepted(*, organization_id: int, version_id: int, at: datetime | None = None) -> bool:
    """True when the version has no terms, or the organization accepted those in force."""
    terms = terms_in_force(version_id=version_id, at=at)
    if terms is None:
        return True
    return TermsAcceptance.objects.filter(terms=terms, organization_id=organization_id).exists()


@transaction.atomic
def terms_accept(*, actor: Actor, version: ModelVersion, terms_version: str) -> TermsAcceptance:
    """Record that the actor's organization accepts the terms in force for `version`. The
    caller names the terms version it showed, so terms that changed meanwhile are not accepted
    unseen (409). Accepting twice returns the first acceptance."""
    require(actor, Permission.DEPLOYMENTS_WRITE)
    terms = terms_in_force(version_id=version.pk)
    if terms is None:
        raise ValidationFailed(f"{version} has no terms to accept.", field="terms_version")
    if terms.version != terms_version:
        raise Conflict(
            f"The terms in force for {version} are version {terms.version!r}, not "
            f"{terms_version!r}: read them again (GET …/terms) and accept those.",
            field="terms_version",
            code="terms_changed",
        )
    existing = TermsAcceptance.objects.filter(terms=terms, organization=actor.organization).first()
    if existing is not None:
        return existing
    acceptance = TermsAcceptance(
        terms=terms,
        organization=actor.organization,
        accepted_by=actor.user,
        accepted_by_label=actor.label[:200],
    )
    try:
        with transaction.atomic():
            acceptance.save()
    except IntegrityError:  # accepted concurrently
        return TermsAcceptance.objects.get(terms=terms, organization=actor.organization)
    _audit(
        actor,
        "catalog.terms.accept",
        version,
        {"terms_version": terms.version, "terms_id": terms.pk},
    )
    return acceptance
