"""Roles inside an organization and the permissions each one grants.

One table decides every check, in the REST API and in the console alike.
"""

from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    BILLING = "billing", "Billing"
    VIEWER = "viewer", "Viewer"


class Permission:
    ORGANIZATION_READ = "organization.read"
    ORGANIZATION_WRITE = "organization.write"
    MEMBERS_READ = "members.read"
    MEMBERS_WRITE = "members.write"
    API_KEYS_READ = "api_keys.read"
    API_KEYS_WRITE = "api_keys.write"
    DEPLOYMENTS_READ = "deployments.read"
    DEPLOYMENTS_WRITE = "deployments.write"
    USAGE_READ = "usage.read"
    BILLING_READ = "billing.read"
    BILLING_WRITE = "billing.write"
    AUDIT_READ = "audit.read"
    # A publisher organization's catalog listings (drafts of cards, versions, prices, terms).
    LISTINGS_WRITE = "listings.write"
    # Single sign-on decides who can become a member: its settings are the owners' alone.
    SSO_READ = "sso.read"
    SSO_WRITE = "sso.write"


_EVERYONE = {
    Permission.ORGANIZATION_READ,
    Permission.MEMBERS_READ,
    Permission.DEPLOYMENTS_READ,
    Permission.USAGE_READ,
}
_BUILDERS = _EVERYONE | {
    Permission.API_KEYS_READ,
    Permission.API_KEYS_WRITE,
    Permission.DEPLOYMENTS_WRITE,
    Permission.LISTINGS_WRITE,
}
_BILLING = _EVERYONE | {Permission.BILLING_READ, Permission.BILLING_WRITE}

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    Role.OWNER: frozenset(
        _BUILDERS
        | _BILLING
        | {
            Permission.ORGANIZATION_WRITE,
            Permission.MEMBERS_WRITE,
            Permission.AUDIT_READ,
            Permission.SSO_READ,
            Permission.SSO_WRITE,
        }
    ),
    Role.ADMIN: frozenset(
        _BUILDERS
        | {
            Permission.BILLING_READ,
            Permission.ORGANIZATION_WRITE,
            Permission.MEMBERS_WRITE,
            Permission.AUDIT_READ,
            Permission.SSO_READ,
        }
    ),
    Role.DEVELOPER: frozenset(_BUILDERS),
    Role.BILLING: frozenset(_BILLING),
    Role.VIEWER: frozenset(_EVERYONE),
}


def role_has_permission(role: str, permission: str) -> bool:
    return permission in ROLE_PERMISSIONS.get(role, frozenset())


def role_can_grant(granter: str, role: str) -> bool:
    """Nobody hands out more than they hold: a role's permissions must be a subset of theirs."""
    return ROLE_PERMISSIONS[role] <= ROLE_PERMISSIONS[granter]


def role_cap(role: str, ceiling: str) -> str:
    """The most a key of `role` may keep once its holder's role is `ceiling`: the largest role
    whose permissions are in both (never more than either: a developer's key under a billing
    member becomes a viewer key, not a billing key). Viewer is always such a role."""
    allowed = ROLE_PERMISSIONS[role] & ROLE_PERMISSIONS[ceiling]
    fitting = [candidate for candidate in Role.values if ROLE_PERMISSIONS[candidate] <= allowed]
    return max(fitting, key=lambda candidate: len(ROLE_PERMISSIONS[candidate]))
