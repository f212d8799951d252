"""Who may change the catalog: operators, i.e. the platform team.

An operator is a staff user (console session or admin), an owner or admin of the platform's own
organization (slug `platform`, the one that owns the serverless pools) using a management key,
or the platform itself (management commands, which act with no organization). Everyone else may
only read.
"""

from rest_framework import exceptions, permissions

from accounts.actors import Actor
from accounts.permissions import IsOrganizationMember, actor_for_request
from accounts.roles import Role
from controlplane.errors import PermissionDenied

PLATFORM_ORGANIZATION_SLUG = "platform"
_OPERATOR_ROLES = {Role.OWNER, Role.ADMIN}


def operator_system_actor() -> Actor:
    """The platform acting on its catalog (seeds, imports from the command line)."""
    return Actor(organization=None, role=Role.OWNER)


def is_operator(actor: Actor | None) -> bool:
    if actor is None:
        return False
    if actor.user is not None:
        if actor.user.is_staff:
            return True
    elif actor.api_key is None and actor.organization is None:
        return True  # operator_system_actor()
    organization = actor.organization
    return (
        organization is not None
        and organization.slug == PLATFORM_ORGANIZATION_SLUG
        and actor.role in _OPERATOR_ROLES
    )


def require_operator(actor: Actor) -> None:
    if not is_operator(actor):
        raise PermissionDenied(
            "Only operators (staff, or admins of the platform organization) may change the catalog."
        )


class CatalogAccess(permissions.BasePermission):
    """Members of any organization read; operators write. A staff user needs no membership."""

    def has_permission(self, request, view):
        if not callable(getattr(view, request.method.lower(), None)):
            return True  # DRF answers 405 (a method the view lacks is no permission question)
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_staff", False) and user.is_authenticated:
            actor = actor_for_request(request) or Actor(
                organization=None, role=Role.OWNER, user=user
            )
            request.actor = actor
            return True
        IsOrganizationMember().has_permission(request, view)  # authenticates, sets request.actor
        if request.method in permissions.SAFE_METHODS:
            return True
        if not is_operator(request.actor):
            raise exceptions.PermissionDenied(
                "Only operators (staff, or admins of the platform organization) may change the "
                "catalog."
            )
        return True


class OperatorsOnly(CatalogAccess):
    """Operators read and write; anyone else is refused (403), reads included: provider
    connections, costs and margins are the platform's business."""

    def has_permission(self, request, view):
        super().has_permission(request, view)
        if request.method in permissions.SAFE_METHODS and not is_operator(request.actor):
            raise exceptions.PermissionDenied("Only operators may see this.")
        return True
