from accounts import selectors as account_selectors
from accounts.roles import Permission
from billing import selectors as billing_selectors
from console.views.base import ConsoleView
from deployments import selectors as deployment_selectors
from deployments.models import Deployment

RECENT = 5


class OverviewView(ConsoleView):
    """Where to start: the organization's deployments and spend, and the next step to take."""

    section = "overview"

    def get(self, request):
        actor = request.actor
        organization = actor.organization
        context = {"spend": billing_selectors.period_spend(organization=organization)}
        if actor.can(Permission.DEPLOYMENTS_READ):
            live = deployment_selectors.deployment_list(organization=organization).exclude(
                status=Deployment.Status.DELETED
            )
            context["deployment_count"] = live.count()
            context["deployments"] = list(live.order_by("-created_at")[:RECENT])
        if actor.can(Permission.API_KEYS_READ):
            context["has_keys"] = (
                account_selectors.api_key_list(organization=organization)
                .filter(revoked_at__isnull=True)
                .exists()
            )
        return self.render("console/overview.html", context)
