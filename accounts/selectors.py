from django.db.models import QuerySet

from accounts.models import (
    APIKey,
    AuditLogEntry,
    Membership,
    Organization,
    SingleSignOnConfiguration,
    User,
)


def membership_list(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user")


def _session_memberships(*, user: User, sso_organization_id: int | None) -> QuerySet[Membership]:
    """The memberships a console session may act through. A session signed in through an
    organization's identity provider acts for that organization only (the provider speaks for
    nobody else); a password session, for every organization that has not switched password
    sign-in off (accounts/sso.py)."""
    memberships = Membership.objects.filter(
        user=user, organization__status=Organization.Status.ACTIVE
    ).select_related("organization")
    if sso_organization_id is not None:
        return memberships.filter(organization_id=sso_organization_id)
    return memberships.exclude(
        organization_id__in=SingleSignOnConfiguration.objects.filter(
            enabled=True, password_login_enabled=False
        ).values("organization_id")
    )


def membership_list_for_user(
    *, user: User, sso_organization_id: int | None = None
) -> QuerySet[Membership]:
    """The organizations a session may act for (the console's organization switcher)."""
    return _session_memberships(user=user, sso_organization_id=sso_organization_id).order_by(
        "organization__name", "organization_id"
    )


def membership_for_user(
    *, user: User, organization_id: int | None = None, sso_organization_id: int | None = None
) -> Membership | None:
    """The membership a session acts through: the chosen organization, else the oldest one."""
    memberships = _session_memberships(user=user, sso_organization_id=sso_organization_id)
    if organization_id is not None:
        chosen = memberships.filter(organization_id=organization_id).first()
        if chosen:
            return chosen
    return memberships.order_by("created_at", "id").first()


def api_key_list(*, organization: Organization) -> QuerySet[APIKey]:
    return APIKey.objects.filter(organization=organization).select_related("created_by")


def api_key_by_secret(secret: str) -> APIKey | None:
    """The key a presented secret belongs to, if any. Compares hashes in constant time."""
    if (
        not secret.startswith("sk-")
        or len(secret) != 3 + APIKey.PREFIX_LENGTH + APIKey.SECRET_LENGTH
    ):
        return None
    prefix = secret[3 : 3 + APIKey.PREFIX_LENGTH]
    key = APIKey.objects.select_related("organization", "project").filter(prefix=prefix).first()
    if key is None or not key.matches(secret):
        return None
    return key


def audit_log_list(*, organization: Organization) -> QuerySet[AuditLogEntry]:
    return AuditLogEntry.objects.filter(organization=organization)
