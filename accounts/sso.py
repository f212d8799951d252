"""Single sign-on with an organization's OpenID Connect provider: its settings (owners only),
and what a verified sign-in does (find or provision the person, just in time).

The protocol itself is in accounts/oidc.py (Authlib). The rules here:
- A provider speaks for its own organization only. A session opened through organization A's
  provider acts for A alone (accounts/permissions.py), whoever the person is elsewhere: an
  owner who points A at a provider of their own can make it assert any email, so its word
  must never open the person's other organizations.
- People are recognised by (issuer, subject) once linked; email links only the first time, and
  only to a person not yet linked to another subject of that provider.
- With password sign-in off, the organization is reachable only through its provider: password
  sessions do not see it, and the login form refuses a password that could reach nothing.
"""

import logging
import re

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import (
    MemberRemoval,
    Membership,
    Organization,
    SingleSignOnConfiguration,
    SingleSignOnIdentity,
    User,
)
from accounts.roles import Permission, Role
from accounts.services import _check_grant, _jsonable, audit_record, require
from controlplane.errors import NotFound, ValidationFailed
from controlplane.secrets_at_rest import encrypt

logger = logging.getLogger(__name__)

MAX_DOMAINS = 50
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_SETTINGS = {
    "enabled",
    "issuer",
    "client_id",
    "client_secret",
    "allowed_email_domains",
    "default_role",
    "password_login_enabled",
}


class SignInRefused(Exception):
    """The provider signed the person in, but our rules do not let them in. `reason` is a short
    code for logs and tests; `message` is shown to the person."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- Selectors -------------------------------------------------------------------------------


def sso_configuration_for(*, organization: Organization) -> SingleSignOnConfiguration | None:
    return SingleSignOnConfiguration.objects.filter(organization=organization).first()


def sso_configuration_enabled(*, slug: str) -> SingleSignOnConfiguration | None:
    return (
        SingleSignOnConfiguration.objects.select_related("organization")
        .filter(
            enabled=True,
            organization__slug=slug,
            organization__status=Organization.Status.ACTIVE,
        )
        .first()
    )


def sso_configuration_for_email(*, email: str) -> SingleSignOnConfiguration | None:
    """The enabled configuration that claims the email's domain, when exactly one does (the
    login page's routing; two organizations claiming one domain must be chosen by slug)."""
    domain = email_domain(email)
    if not domain:
        return None
    claiming = [
        configuration
        for configuration in SingleSignOnConfiguration.objects.select_related(
            "organization"
        ).filter(enabled=True, organization__status=Organization.Status.ACTIVE)
        if domain in configuration.allowed_email_domains
    ]
    return claiming[0] if len(claiming) == 1 else None


def sso_required_for(*, email: str) -> SingleSignOnConfiguration | None:
    """Whether a password sign-in for `email` would reach nothing: the person exists and every
    organization they belong to has password sign-in off. Then the login form says to use
    single sign-on, before it checks any password (no oracle for the password, and no lockout
    count an attacker could run up). Decided by memberships, not by email domain: a domain
    claim is not verified, so it must not keep anyone else's password sign-in out.
    """
    user = User.objects.filter(email=email.strip().lower()).first()
    if user is None:
        return None
    memberships = list(
        Membership.objects.filter(user=user, organization__status=Organization.Status.ACTIVE)
    )
    if not memberships:
        return None
    enforced = {
        configuration.organization_id: configuration
        for configuration in organizations_requiring_sso()
        .select_related("organization")
        .filter(organization_id__in=[m.organization_id for m in memberships])
    }
    if all(m.organization_id in enforced for m in memberships):
        return enforced[memberships[0].organization_id]
    return None


def organizations_requiring_sso() -> QuerySet[SingleSignOnConfiguration]:
    return SingleSignOnConfiguration.objects.filter(enabled=True, password_login_enabled=False)


def email_domain(email: str) -> str:
    local, at, domain = email.strip().lower().rpartition("@")
    return domain if at and local else ""


# --- Services --------------------------------------------------------------------------------


def sso_configure(*, actor: Actor, **fields) -> SingleSignOnConfiguration:
    """Create or change the organization's single sign-on (owners only).

    A first configuration needs the issuer, client id and client secret; later calls change
    what they name (the secret only when given). Enabling it reads the provider's discovery
    document first, so a wrong issuer is refused here rather than at everyone's next sign-in.
    Password sign-in can be switched off only while single sign-on is enabled, and by a person
    only from a session signed in through it.
    """
    require(actor, Permission.SSO_WRITE)
    unknown = set(fields) - _SETTINGS
    if unknown:
        name = sorted(unknown)[0]
        raise ValidationFailed(f"{name} is not a single sign-on setting.", field=name)
    from accounts import oidc  # the protocol module imports the models; keep services light

    if "issuer" in fields:
        fields["issuer"] = oidc.check_issuer_url(fields["issuer"])
    if "allowed_email_domains" in fields:
        fields["allowed_email_domains"] = _clean_domains(fields["allowed_email_domains"])
    if "default_role" in fields:
        _check_default_role(actor, fields["default_role"])
    if "client_id" in fields and not fields["client_id"].strip():
        raise ValidationFailed("Give the client id the provider issued.", field="client_id")
    if "client_secret" in fields and not fields["client_secret"]:
        raise ValidationFailed(
            "Give the client secret the provider issued (leave it out to keep the stored one).",
            field="client_secret",
        )
    current = sso_configuration_for(organization=actor.organization)
    switching_passwords_off = fields.get("password_login_enabled") is False and (
        current is None or current.password_login_enabled
    )
    if switching_passwords_off and actor.user is not None and not actor.signed_in_through_sso:
        # The person would lose the organization with their next click, before anyone has
        # shown that the provider lets people in. (Keys and the platform may: not sessions.)
        raise ValidationFailed(
            "Sign in with single sign-on first (log out, then “Sign in with SSO”), then switch "
            "password sign-in off: that proves the provider lets you in.",
            field="password_login_enabled",
        )
    issuer = fields.get("issuer", current.issuer if current else "")
    enabled = fields.get("enabled", current.enabled if current else False)
    if enabled:
        # Outside the transaction: a slow provider must not hold the row locked.
        oidc.discover(issuer)
    return _sso_save(actor=actor, fields=fields)


@transaction.atomic
def _sso_save(*, actor: Actor, fields: dict) -> SingleSignOnConfiguration:
    configuration = (
        SingleSignOnConfiguration.objects.select_for_update()
        .filter(organization=actor.organization)
        .first()
    )
    creating = configuration is None
    if creating:
        missing = [
            name for name in ("issuer", "client_id", "client_secret") if not fields.get(name)
        ]
        if missing:
            raise ValidationFailed(
                f"A first single sign-on configuration needs {', '.join(missing)}.",
                field=missing[0],
            )
        configuration = SingleSignOnConfiguration(organization=actor.organization)
    changes = {}
    secret = fields.pop("client_secret", None)
    if secret is not None:
        configuration.client_secret_encrypted = encrypt(secret)
        changes["client_secret"] = "set" if creating else "replaced"  # never the value
    for name, value in fields.items():
        old = getattr(configuration, name)
        if creating or old != value:
            changes[name] = value if creating else [_jsonable(old), _jsonable(value)]
            setattr(configuration, name, value)
    if not configuration.enabled and not configuration.password_login_enabled:
        raise ValidationFailed(
            "Password sign-in can be switched off only while single sign-on is enabled "
            "(members would have no way in).",
            field="password_login_enabled",
        )
    if not changes:
        return configuration
    configuration.full_clean()
    configuration.save()
    audit_record(
        actor=actor,
        action="sso.create" if creating else "sso.update",
        target=configuration,
        changes=changes,
    )
    return configuration


@transaction.atomic
def sso_remove(*, actor: Actor) -> None:
    """Remove the organization's single sign-on; members sign in with passwords again. The
    identities stay, so the same provider, configured again, finds the same people."""
    require(actor, Permission.SSO_WRITE)
    configuration = (
        SingleSignOnConfiguration.objects.select_for_update()
        .filter(organization=actor.organization)
        .first()
    )
    if configuration is None:
        raise NotFound("This organization has no single sign-on configured.")
    audit_record(actor=actor, action="sso.remove", target=configuration)
    configuration.delete()


def sso_sign_in(*, configuration: SingleSignOnConfiguration, claims: dict) -> User:
    """The person a verified ID token names (`_sso_sign_in`). Two first sign-ins of one person
    at once (two tabs) race to link them: the loser's unique constraint fails, and its second
    try finds what the winner made."""
    try:
        return _sso_sign_in(configuration=configuration, claims=claims)
    except IntegrityError:
        return _sso_sign_in(configuration=configuration, claims=claims)


@transaction.atomic
def _sso_sign_in(*, configuration: SingleSignOnConfiguration, claims: dict) -> User:
    """The person a verified ID token names, provisioned just in time if new.

    `claims` come from accounts/oidc.py, which verified the token's signature, issuer,
    audience, expiry and nonce. Here: the email must be verified (when the provider says) and
    in an allowed domain; a known (issuer, subject) is that person whatever the email says
    now; a new subject is linked to the person with that email, made if none exists, and
    given a membership with the default role if they have none — unless the organization
    removed them (then only adding them back lets them in). Every write is audited.
    """
    organization = configuration.organization
    issuer, subject = configuration.issuer, str(claims.get("sub") or "")
    email = str(claims.get("email") or "").strip().lower()
    if not subject:
        raise SignInRefused("no_subject", "The identity provider did not say who you are.")
    if not email:
        raise SignInRefused(
            "no_email",
            "The identity provider did not share your email address (scope 'email').",
        )
    if claims.get("email_verified") is False:
        raise SignInRefused(
            "email_unverified",
            f"The identity provider has not verified {email}. Verify it there first.",
        )
    if email_domain(email) not in configuration.allowed_email_domains:
        raise SignInRefused(
            "domain_not_allowed",
            f"{email} is not in a domain {organization.name} allows for single sign-on.",
        )
    identity = (
        SingleSignOnIdentity.objects.select_for_update()
        .select_related("user")
        .filter(organization=organization, issuer=issuer, subject=subject)
        .first()
    )
    if identity is not None:
        user = identity.user
    else:
        user = User.objects.filter(email=email).first()
        if (
            user is not None
            and SingleSignOnIdentity.objects.filter(
                organization=organization, issuer=issuer, user=user
            ).exists()
        ):
            raise SignInRefused(
                "email_taken",
                f"{email} already signs in as another person of this identity provider. "
                f"Ask an owner of {organization.name}.",
            )
        created = user is None
        if created:
            user = User.objects.create_user(
                email=email, password=None, full_name=str(claims.get("name") or "")[:200]
            )
        identity = SingleSignOnIdentity.objects.create(
            organization=organization, user=user, issuer=issuer, subject=subject
        )
        actor = Actor(organization=organization, role=configuration.default_role, user=user)
        audit_record(
            actor=actor,
            action="sso.identity_link",
            target=identity,
            changes={"issuer": issuer, "subject": subject, "new_user": created},
        )
    if not user.is_active:
        raise SignInRefused("inactive", "This account is deactivated. Ask the platform operators.")
    if (
        not Membership.objects.filter(organization=organization, user=user).exists()
        and MemberRemoval.objects.filter(organization=organization, user=user).exists()
    ):
        raise SignInRefused(
            "removed",
            f"{organization.name} removed you from its members. Ask one of its owners or "
            "admins to add you again.",
        )
    membership, joined = Membership.objects.get_or_create(
        organization=organization, user=user, defaults={"role": configuration.default_role}
    )
    if joined:
        actor = Actor(organization=organization, role=membership.role, user=user)
        audit_record(
            actor=actor,
            action="member.add",
            target=membership,
            changes={"role": membership.role, "via": "sso"},
        )
    identity.last_sign_in_at = timezone.now()
    identity.save(update_fields=["last_sign_in_at"])
    return user


def _clean_domains(domains) -> list[str]:
    if not isinstance(domains, list | tuple):
        raise ValidationFailed("Give a list of email domains.", field="allowed_email_domains")
    cleaned = sorted({str(domain).strip().lower().lstrip("@") for domain in domains} - {""})
    if not cleaned:
        raise ValidationFailed(
            "Name at least one email domain, such as example.com.", field="allowed_email_domains"
        )
    if len(cleaned) > MAX_DOMAINS:
        raise ValidationFailed(
            f"At most {MAX_DOMAINS} email domains.", field="allowed_email_domains"
        )
    bad = [domain for domain in cleaned if not _DOMAIN.match(domain)]
    if bad:
        raise ValidationFailed(
            f"{bad[0]!r} is not an email domain such as example.com.",
            field="allowed_email_domains",
        )
    return cleaned


def _check_default_role(actor: Actor, role: str) -> None:
    _check_grant(actor, role)
    if role == Role.OWNER:
        raise ValidationFailed(
            "People who sign in for the first time cannot become owners; pick a lesser role "
            "and promote them by hand.",
            field="default_role",
        )
