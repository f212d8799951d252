"""Who may call an endpoint: a member of an organization whose role grants the view's
permission for the HTTP method. Views declare `required_permissions = {"GET": ..., "POST": ...}`.
"""

from rest_framework import exceptions, permissions

from accounts.actors import Actor
from accounts.authentication import APIKeyPrincipal
from accounts.roles import role_has_permission
from accounts.selectors import membership_for_user

SESSION_ORGANIZATION_KEY = "organization_id"
# Set when the session was opened through an organization's identity provider: the session
# acts for that organization only (accounts/selectors.py).
SESSION_SSO_ORGANIZATION_KEY = "sso_organization_id"


def actor_for_request(request) -> Actor | None:
    """The actor behind an authenticated request, cached on the request."""
    if hasattr(request, "_sirocco_actor"):
        return request._sirocco_actor
    actor = None
    user = getattr(request, "user", None)
    request_id = getattr(request, "id", "") or getattr(getattr(request, "_request", None), "id", "")
    if isinstance(user, APIKeyPrincipal):
        key = user.api_key
        actor = Actor(
            organization=key.organization, role=key.role, api_key=key, request_id=request_id
        )
    elif user is not None and user.is_authenticated:
        sso_organization_id = request.session.get(SESSION_SSO_ORGANIZATION_KEY)
        membership = membership_for_user(
            user=user,
            organization_id=request.session.get(SESSION_ORGANIZATION_KEY),
            sso_organization_id=sso_organization_id,
        )
        if membership is not None:
            actor = Actor(
                organization=membership.organization,
                role=membership.role,
                user=user,
                request_id=request_id,
                signed_in_through_sso=sso_organization_id == membership.organization_id,
            )
    request._sirocco_actor = actor
    return actor


class IsOrganizationMember(permissions.BasePermission):
    def has_permission(self, request, view):
        if request.user is None or not request.user.is_authenticated:
            raise exceptions.NotAuthenticated(
                "Authentication required. Send 'Authorization: Bearer sk-…' with a management key."
            )
        actor = actor_for_request(request)
        if actor is None:
            raise exceptions.PermissionDenied("You are not a member of any active organization.")
        request.actor = actor
        required = getattr(view, "required_permissions", {}).get(request.method)
        if required is None and request.method in ("HEAD", "OPTIONS"):
            required = getattr(view, "required_permissions", {}).get("GET")
        if required and not role_has_permission(actor.role, required):
            raise exceptions.PermissionDenied(
                f"Your role {actor.role!r} may not do this ({required}). "
                "Ask an owner or admin of the organization."
            )
        return True
