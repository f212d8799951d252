"""The playground: chat with a deployment from the browser, tokens streaming into the page, or
embed texts with an embedding model (the Embeddings tab: vectors and their cosine similarities).

The page calls the platform's own gateway (`/v1/chat/completions`, stream=true) exactly as a
customer's code does, with a short-lived key: inference scope only, expiring an hour after it
was made, created through the same service as any key (so it is audited, listed and
revocable, and its usage is metered like any other). One key serves a person's session in an
organization until it is about to expire, and no longer than the session: logging out
revokes it, and so does leaving the organization (with the person's other keys). Why not a proxy that holds the session? The gateway
authenticates keys, not sessions, and going through it unchanged means the playground shows
exactly what the API does: limits, budgets, errors and usage included.
"""

import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.dispatch import receiver
from django.shortcuts import redirect
from django.utils import timezone

from accounts import services as account_services
from accounts.models import APIKey
from accounts.roles import Permission, Role
from catalog.models import Model
from console.views.base import ConsoleView
from console.views.deployments import DeploymentMixin
from deployments import selectors
from deployments.models import Deployment

PLAYGROUND_KEY_SESSION_KEY = "console.playground_key"
KEY_LIFETIME = timedelta(hours=1)
# A key this close to expiry is replaced, so a conversation never dies mid-answer.
KEY_RENEW_BEFORE = timedelta(minutes=10)
CHATTABLE = {
    Deployment.Status.PENDING,
    Deployment.Status.PROVISIONING,
    Deployment.Status.READY,
    Deployment.Status.SCALING,
    Deployment.Status.UPDATING,
}


def playground_key(request) -> str:
    """This session's playground key for the acting organization: reused, or made now."""
    actor = request.actor
    now = timezone.now()
    held = request.session.get(PLAYGROUND_KEY_SESSION_KEY)
    if held and held["organization_id"] == actor.organization.pk:
        still_valid = APIKey.objects.filter(
            pk=held["id"], revoked_at__isnull=True, expires_at__gt=now + KEY_RENEW_BEFORE
        ).exists()
        if still_valid:
            return held["secret"]
    if held:  # about to expire, or made for another organization: it is done with
        account_services.session_key_revoke(
            user=request.user, api_key_id=held["id"], reason="playground.replace"
        )
    # Never outlives the session either (a session shorter than the key's hour).
    lifetime = min(KEY_LIFETIME, timedelta(seconds=settings.SESSION_COOKIE_AGE))
    key, secret = account_services.api_key_create(
        actor=actor,
        name=f"Playground ({actor.label})",
        scopes=[APIKey.Scope.INFERENCE],
        role=Role.VIEWER,
        expires_at=now + lifetime,
    )
    request.session[PLAYGROUND_KEY_SESSION_KEY] = {
        "id": key.pk,
        "secret": secret,
        "organization_id": actor.organization.pk,
    }
    return secret


@receiver(user_logged_out, dispatch_uid="console.playground.revoke_on_logout")
def revoke_playground_key_on_logout(sender, request, user, **kwargs):
    """The playground key dies with the session that made it. (Removal from the organization
    revokes it with the member's other keys; expiry is bounded by the session's age above.)"""
    held = request.session.get(PLAYGROUND_KEY_SESSION_KEY) if request is not None else None
    if held and user is not None:
        account_services.session_key_revoke(
            user=user, api_key_id=held["id"], reason="session.logout"
        )


class PlaygroundIndexView(ConsoleView):
    """Pick a deployment to chat with (the sidebar's Playground)."""

    section = "playground"
    required_permissions = {"GET": Permission.API_KEYS_WRITE}

    def get(self, request):
        deployments = (
            selectors.deployment_list(organization=request.actor.organization)
            .filter(status__in=CHATTABLE)
            .order_by("name")
        )
        chosen = request.GET.get("deployment")
        if chosen:
            match = deployments.filter(pk=chosen).first() if _is_uuid(chosen) else None
            if match is not None:
                return redirect("console:playground", deployment_id=match.pk)
        return self.render("console/playground/index.html", {"deployments": deployments})


class PlaygroundView(DeploymentMixin, ConsoleView):
    section = "playground"
    required_permissions = {"GET": Permission.API_KEYS_WRITE}

    def get(self, request, deployment_id):
        deployment = self.get_deployment(deployment_id)
        embeds = _serves_embeddings(deployment)
        tab = request.GET.get("tab")
        if tab not in ("chat", "embeddings"):
            tab = "embeddings" if embeds else "chat"
        context = {
            "deployment": deployment,
            "chattable": deployment.status in CHATTABLE,
            "embeds": embeds,
            "tab": tab,
        }
        if context["chattable"]:
            context["key"] = playground_key(request)
        template = "embeddings.html" if tab == "embeddings" else "chat.html"
        response = self.render(f"console/playground/{template}", context)
        response["Cache-Control"] = "no-store"  # the page holds a (short-lived) key
        return response


def _serves_embeddings(deployment: Deployment) -> bool:
    tasks = deployment.model_version.model.tasks
    return Model.Task.EMBEDDINGS in tasks and Model.Task.CHAT not in tasks


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
