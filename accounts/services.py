import secrets
import string
from datetime import datetime
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Case, F, Value, When
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import (
    APIKey,
    AuditLogEntry,
    MemberRemoval,
    Membership,
    Organization,
    Project,
    User,
)
from accounts.roles import Permission, Role, role_can_grant, role_cap
from accounts.signals import api_key_revoked
from controlplane.errors import Conflict, NotFound, PermissionDenied, ValidationFailed

_KEY_ALPHABET = string.ascii_letters + string.digits


def require(actor: Actor, permission: str) -> None:
    """Raise PermissionDenied unless the actor's role grants `permission`."""
    if not actor.can(permission):
        raise PermissionDenied(
            f"Your role {actor.role!r} may not do this ({permission}). "
            "Ask an owner or admin of the organization."
        )


def audit_record(
    *, actor: Actor, action: str, target, changes: dict | None = None, organization=None
) -> AuditLogEntry:
    """Append one entry to the audit log. Every service that writes calls this."""
    entry = audit_entry(
        actor=actor, action=action, target=target, changes=changes, organization=organization
    )
    entry.save()
    return entry


def audit_entry(
    *, actor: Actor, action: str, target, changes: dict | None = None, organization=None
) -> AuditLogEntry:
    """An unsaved entry, for a service that writes many at once (`bulk_create`)."""
    return AuditLogEntry(
        organization=organization or actor.organization,
        actor_user=actor.user,
        actor_api_key=actor.api_key,
        actor_label=actor.label,
        action=action,
        target_type=target._meta.label_lower,
        target_id=str(target.pk),
        target_repr=str(target)[:200],
        changes=changes or {},
        request_id=actor.request_id,
    )


@transaction.atomic
def organization_create(
    *, slug: str, name: str, owner: User, billing_email: str = "", currency: str = "USD"
) -> Organization:
    if Organization.objects.filter(slug=slug).exists():
        raise Conflict(f"The organization slug {slug!r} is taken; choose another.", field="slug")
    organization = Organization(
        slug=slug, name=name, billing_email=billing_email or owner.email, currency=currency
    )
    organization.full_clean()
    organization.save()
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    actor = Actor(organization=organization, role=Role.OWNER, user=owner)
    audit_record(actor=actor, action="organization.create", target=organization)
    return organization


ORGANIZATION_EDITABLE_FIELDS = {"name", "billing_email", "currency"}


@transaction.atomic
def organization_update(*, actor: Actor, organization: Organization, **fields) -> Organization:
    """Change the organization's profile. Spend limits are a billing permission."""
    unknown = set(fields) - ORGANIZATION_EDITABLE_FIELDS - {"monthly_spend_limit"}
    if unknown:
        raise ValidationFailed(
            f"{sorted(unknown)[0]} cannot be changed here.", field=sorted(unknown)[0]
        )
    if "monthly_spend_limit" in fields:
        require(actor, Permission.BILLING_WRITE)
    if set(fields) & ORGANIZATION_EDITABLE_FIELDS:
        require(actor, Permission.ORGANIZATION_WRITE)
    organization = Organization.objects.select_for_update().get(pk=organization.pk)
    changes = {}
    for name, value in fields.items():
        old = getattr(organization, name)
        if old != value:
            changes[name] = [_jsonable(old), _jsonable(value)]
            setattr(organization, name, value)
    if changes:
        organization.full_clean()
        organization.save()
        audit_record(
            actor=actor, action="organization.update", target=organization, changes=changes
        )
    return organization


@transaction.atomic
def member_add(*, actor: Actor, email: str, role: str) -> Membership:
    """Add a person to the organization, creating their user if needed (no password yet:
    they set one through password reset)."""
    require(actor, Permission.MEMBERS_WRITE)
    _check_grant(actor, role)
    email = email.strip().lower()
    user, _ = User.objects.get_or_create(email=email, defaults={"password": "!"})
    if Membership.objects.filter(organization=actor.organization, user=user).exists():
        raise Conflict(f"{email} is already a member; change their role instead.", field="email")
    membership = Membership.objects.create(organization=actor.organization, user=user, role=role)
    member_removal_forget(organization_id=actor.organization.pk, user_id=user.pk)
    audit_record(actor=actor, action="member.add", target=membership, changes={"role": role})
    return membership


@transaction.atomic
def member_update_role(*, actor: Actor, membership: Membership, role: str) -> Membership:
    require(actor, Permission.MEMBERS_WRITE)
    _check_grant(actor, role)
    _check_grant(actor, membership.role)
    if membership.role == Role.OWNER and role != Role.OWNER:
        _ensure_another_owner(membership)
    old = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(
        actor=actor, action="member.update", target=membership, changes={"role": [old, role]}
    )
    member_keys_bind(actor=actor, membership=membership)
    return membership


@transaction.atomic
def member_remove(*, actor: Actor, membership: Membership) -> None:
    require(actor, Permission.MEMBERS_WRITE)
    _check_grant(actor, membership.role)
    if membership.role == Role.OWNER:
        _ensure_another_owner(membership)
    audit_record(actor=actor, action="member.remove", target=membership)
    member_keys_bind(actor=actor, membership=membership, removed=True)
    from accounts.projects import project_memberships_drop

    project_memberships_drop(organization_id=membership.organization_id, user_id=membership.user_id)
    member_removal_record(organization_id=membership.organization_id, user_id=membership.user_id)
    membership.delete()


def member_removal_record(*, organization_id: int, user_id: int) -> None:
    """Remember that the organization removed the person: single sign-on will not provision
    them again until they are added back (member_add). Called by member_remove and by the
    admin, the only other writer of memberships."""
    MemberRemoval.objects.update_or_create(organization_id=organization_id, user_id=user_id)


def member_removal_forget(*, organization_id: int, user_id: int) -> None:
    """The person was added back on purpose: single sign-on may let them in again. Called by
    member_add and by the admin."""
    MemberRemoval.objects.filter(organization_id=organization_id, user_id=user_id).delete()


@transaction.atomic
def member_keys_bind(*, actor: Actor, membership: Membership, removed: bool = False) -> None:
    """Keep a person's keys within what they hold in the organization now.

    A key acts on the authority of the person it was made for (`created_by`, which a key made
    by a key inherits), so it must not outlive that authority. When the person leaves, every
    key of theirs is revoked (and the gateway told at once). When their role drops, each key
    whose role grants more than the new one is capped to what both allow: the keys keep
    working for what the person may still do, so a demotion does not break a production
    backend, while a management key loses the rights its maker lost. Every change is audited.

    Called by the member services and by the admin, the only other writer of memberships.
    """
    keys = APIKey.objects.select_for_update().filter(
        organization_id=membership.organization_id,
        created_by_id=membership.user_id,
        revoked_at__isnull=True,
    )
    reason = "member.remove" if removed else "member.update"
    if removed:
        _api_keys_revoke(actor=actor, keys=list(keys), reason=reason)
        return
    for key in keys:
        capped = role_cap(key.role, membership.role)
        if capped != key.role:
            old, key.role = key.role, capped
            key.save(update_fields=["role"])
            audit_record(
                actor=actor,
                action="api_key.cap",
                target=key,
                organization=key.organization,
                changes={"role": [old, capped], "reason": reason},
            )


@transaction.atomic
def user_keys_revoke(*, actor_user: User | None, user: User, reason: str) -> int:
    """Revoke every live key a person's authority stands behind, in all their organizations
    (the account is being deactivated or deleted). Returns how many were revoked."""
    keys = list(
        APIKey.objects.select_for_update()
        .select_related("organization")
        .filter(created_by=user, revoked_at__isnull=True)
    )
    for key in keys:
        actor = Actor(organization=key.organization, role=Role.OWNER, user=actor_user)
        _api_keys_revoke(actor=actor, keys=[key], reason=reason)
    return len(keys)


def _check_grant(actor: Actor, role: str) -> None:
    if role not in Role.values:
        raise ValidationFailed(
            f"Unknown role {role!r}. Use one of: {', '.join(Role.values)}.", field="role"
        )
    if not role_can_grant(actor.role, role):
        raise PermissionDenied(
            f"Your role {actor.role!r} cannot grant or change the role {role!r}."
        )


def _ensure_another_owner(membership: Membership) -> None:
    owners = Membership.objects.select_for_update().filter(
        organization_id=membership.organization_id, role=Role.OWNER
    )
    if not owners.exclude(pk=membership.pk).exists():
        raise Conflict("An organization needs at least one owner; make someone else owner first.")


@transaction.atomic
def api_key_create(
    *,
    actor: Actor,
    name: str,
    scopes: list[str] | None = None,
    role: str = Role.DEVELOPER,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    expires_at: datetime | None = None,
    project: Project | None = None,
    allowed_models: list[str] | None = None,
) -> tuple[APIKey, str]:
    """Create a key in a project (the organization's default one unless named) and return it
    with its secret. The secret is never retrievable again."""
    from accounts import projects

    if project is None:
        require(actor, Permission.API_KEYS_WRITE)
        project = projects.project_default(organization=actor.organization)
        granter = actor.role
    else:
        if project.organization_id != actor.organization.pk:
            raise NotFound("No such project in your organization.")
        projects.require_in_project(actor, project, Permission.API_KEYS_WRITE)
        granter = projects.best_role(actor, project)
    allowed_models = projects.clean_allowed_models(allowed_models)
    scopes = sorted(set(scopes or [APIKey.Scope.INFERENCE]))
    bad = [s for s in scopes if s not in APIKey.Scope.values]
    if bad:
        raise ValidationFailed(
            f"Unknown scope {bad[0]!r}. Use {' and/or '.join(APIKey.Scope.values)}.", field="scopes"
        )
    _check_grant(Actor(organization=actor.organization, role=granter), role)
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationFailed("expires_at must be in the future.", field="expires_at")
    name = name.strip()
    if not name:
        raise ValidationFailed("Give the key a name, such as 'production backend'.", field="name")
    for _attempt in range(5):
        prefix = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(APIKey.PREFIX_LENGTH))
        secret = f"sk-{prefix}" + "".join(
            secrets.choice(_KEY_ALPHABET) for _ in range(APIKey.SECRET_LENGTH)
        )
        try:
            with transaction.atomic():
                key = APIKey.objects.create(
                    organization=actor.organization,
                    project=project,
                    name=name,
                    prefix=prefix,
                    allowed_models=allowed_models,
                    secret_hash=APIKey.hash_secret(secret),
                    scopes=scopes,
                    role=role,
                    rpm_limit=rpm_limit,
                    tpm_limit=tpm_limit,
                    expires_at=expires_at,
                    # A key made with a key stands on the same person's authority, so that
                    # removing them revokes both (member_keys_bind).
                    created_by=actor.user or (actor.api_key and actor.api_key.created_by),
                )
            break
        except IntegrityError:  # a prefix collision: 62**12 makes this astronomically rare
            continue
    else:  # pragma: no cover
        raise Conflict("Could not allocate a unique key prefix; try again.")
    audit_record(
        actor=actor,
        action="api_key.create",
        target=key,
        changes={
            "scopes": scopes,
            "role": role,
            "rpm_limit": rpm_limit,
            "tpm_limit": tpm_limit,
            "project": project.name,
            "allowed_models": allowed_models,
        },
    )
    return key, secret


@transaction.atomic
def api_key_revoke(*, actor: Actor, api_key: APIKey) -> APIKey:
    """Revoke a key (idempotent). The row stays, so usage and audit history keep their key."""
    require(actor, Permission.API_KEYS_WRITE)
    if api_key.organization_id != actor.organization.pk:
        raise NotFound("No such API key in your organization.")
    _api_keys_revoke(actor=actor, keys=[api_key])
    return api_key


@transaction.atomic
def session_key_revoke(*, user: User, api_key_id: int, reason: str) -> bool:
    """Revoke a short-lived key a console session made for its person (the playground's),
    because the session ended. Needs no permission: it only ever takes power away, and only
    from a key that person made. Returns whether a live key was revoked."""
    key = (
        APIKey.objects.select_for_update()
        .select_related("organization")
        .filter(pk=api_key_id, created_by=user, revoked_at__isnull=True)
        .first()
    )
    if key is None:
        return False
    actor = Actor(organization=key.organization, role=Role.VIEWER, user=user)
    _api_keys_revoke(actor=actor, keys=[key], reason=reason)
    return True


def _api_keys_revoke(*, actor: Actor, keys: list[APIKey], reason: str = "") -> None:
    """Revoke, audit and broadcast (after commit, so the gateway never re-reads a live row)."""
    now = timezone.now()
    for key in keys:
        if key.revoked_at is not None:
            continue
        key.revoked_at = now
        key.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="api_key.revoke",
            target=key,
            organization=key.organization,
            changes={"reason": reason} if reason else None,
        )
        key_id, prefix = key.pk, key.prefix
        transaction.on_commit(
            lambda key_id=key_id, prefix=prefix: api_key_revoked.send(
                sender=APIKey, api_key_id=key_id, prefix=prefix
            )
        )


def api_keys_touch(*, used: dict[int, datetime]) -> None:
    """Record when keys were last used (key id → time), in one UPDATE; never moves a key's
    last_used_at back (the gateway records uses too). Called off the request path by
    accounts/key_use.py, so no read request writes."""
    if not used:
        return
    when = Case(*(When(pk=key_id, then=Value(at)) for key_id, at in used.items()))
    APIKey.objects.filter(pk__in=list(used)).update(
        last_used_at=Coalesce(Greatest(F("last_used_at"), when), when)
    )


def _jsonable(value):
    return str(value) if isinstance(value, Decimal) else value
