"""What every console page shares: login, the acting organization, role checks, domain errors.

Role checks use the same permission table as the REST API (`accounts.roles`), declared the
same way: `required_permissions = {"GET": Permission.X, "POST": Permission.Y}`.
"""

from dataclasses import dataclass

from django.contrib.auth.views import redirect_to_login
from django.http import Http404
from django.shortcuts import render
from django.utils import timezone
from django.views import View

from accounts.permissions import SESSION_SSO_ORGANIZATION_KEY, actor_for_request
from accounts.roles import Permission, Role
from accounts.selectors import membership_list_for_user
from controlplane.errors import DomainError, NotFound
from controlplane.errors import PermissionDenied as DomainPermissionDenied

ROLE_NAMES = dict(Role.choices)
ALL_PERMISSIONS = [value for name, value in vars(Permission).items() if name.isupper()]


@dataclass(frozen=True)
class NavItem:
    section: str
    label: str
    url_name: str
    permission: str | None = None


# The sidebar, in order. A role that lacks an item's permission does not see the item.
NAV = [
    NavItem("overview", "Overview", "console:overview"),
    NavItem("models", "Models", "console:models"),
    NavItem("deployments", "Deployments", "console:deployments", Permission.DEPLOYMENTS_READ),
    NavItem("playground", "Playground", "console:playground-index", Permission.API_KEYS_WRITE),
    NavItem("usage", "Usage", "console:usage", Permission.USAGE_READ),
    NavItem("invoices", "Invoices", "console:invoices", Permission.BILLING_READ),
    NavItem("api-keys", "API keys", "console:api-keys", Permission.API_KEYS_READ),
    NavItem("projects", "Projects", "console:projects", Permission.ORGANIZATION_READ),
    NavItem("settings", "Organization", "console:settings", Permission.ORGANIZATION_READ),
    # Shown to publisher organizations only (page_context).
    NavItem("publisher", "Publisher", "console:publisher"),
]


def page_context(request, section: str = "") -> dict:
    """What the layout needs: who acts for which organization, what they may do, the sidebar."""
    actor = request.actor
    return {
        "actor": actor,
        "role_name": ROLE_NAMES.get(actor.role, actor.role),
        # `can.deployments_write` in templates: hide what the role may not do.
        "can": {
            permission.replace(".", "_"): actor.can(permission) for permission in ALL_PERMISSIONS
        },
        "memberships": membership_list_for_user(
            user=request.user, sso_organization_id=request.session.get(SESSION_SSO_ORGANIZATION_KEY)
        ),
        "nav": [
            item
            for item in NAV
            if (item.permission is None or actor.can(item.permission))
            and (item.section != "publisher" or _is_publisher(actor))
        ],
        "section": section,
        "now": timezone.now(),
    }


def _is_publisher(actor) -> bool:
    from catalog.models import Publisher

    return Publisher.objects.filter(organization=actor.organization).exists()


class ConsoleView(View):
    """A page of the console. `request.actor` is set before the handler runs."""

    required_permissions: dict[str, str] = {}
    section = ""

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        actor = actor_for_request(request)
        if actor is None:
            return render(request, "console/no_organization.html", status=403)
        request.actor = actor
        method = "GET" if request.method == "HEAD" else request.method
        required = self.required_permissions.get(method)
        if required and not actor.can(required):
            return forbidden(request, required)
        try:
            return super().dispatch(request, *args, **kwargs)
        except NotFound as error:
            raise Http404(error.message) from error
        except DomainPermissionDenied as error:
            return forbidden(request, message=error.message)

    def render(self, template: str, context: dict | None = None, *, status: int = 200):
        return render(
            self.request,
            template,
            {**page_context(self.request, self.section), **(context or {})},
            status=status,
        )


def forbidden(request, permission: str = "", *, message: str = ""):
    actor = request.actor
    if not message:
        message = (
            f"Your role in {actor.organization.name} is {ROLE_NAMES.get(actor.role, actor.role)}, "
            f"which may not do this ({permission}). Ask an owner or admin of the organization."
        )
    return render(
        request, "console/forbidden.html", {**page_context(request), "message": message}, status=403
    )


def apply_domain_error(form, error: DomainError) -> None:
    """Show a service's error on the form: beside its field when it names one we show."""
    field = error.field if error.field in form.fields else None
    form.add_error(field, error.message)
