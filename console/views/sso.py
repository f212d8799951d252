"""Single sign-on in the console: signing in through an organization's identity provider, and
the owners' settings page. The protocol is accounts/oidc.py; the rules are accounts/sso.py."""

import logging
from urllib.parse import urlencode, urlsplit

from django.contrib import messages
from django.contrib.auth import login
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views import View

from accounts import oidc, sso
from accounts.permissions import SESSION_ORGANIZATION_KEY, SESSION_SSO_ORGANIZATION_KEY
from accounts.roles import Permission
from console.forms import SingleSignOnForm, SingleSignOnStartForm
from console.views.base import ConsoleView, apply_domain_error
from controlplane.errors import DomainError
from controlplane.secrets_at_rest import SecretUnreadable

logger = logging.getLogger(__name__)

_NEXT_KEY = "sso_next"
# Django's own backend: the person was authenticated by the provider, not by a password, and
# the session must name a backend that can load them again.
_BACKEND = "django.contrib.auth.backends.ModelBackend"


class SingleSignOnStartView(View):
    """`/login/sso/`: ask for a work email or an organization, then go to its provider."""

    def get(self, request):
        return self.show(SingleSignOnStartForm())

    def post(self, request):
        form = SingleSignOnStartForm(request.POST)
        if not form.is_valid():
            return self.show(form, status=400)
        given = form.cleaned_data["email_or_organization"].strip()
        if "@" in given:
            configuration = sso.sso_configuration_for_email(email=given)
        else:
            configuration = sso.sso_configuration_enabled(slug=given.lower())
        if configuration is None:
            form.add_error(
                "email_or_organization",
                "No organization signs in with single sign-on for that. Check it, try your "
                "organization's short name, or log in with your password.",
            )
            return self.show(form, status=400)
        # A page with a link, not a redirect: the console's Content-Security-Policy
        # (form-action 'self') rightly stops a form's submission from landing on another
        # origin, and the page says where the person is about to type their password.
        query = {"next": request.POST.get("next", "")}
        if "@" in given:
            query["login_hint"] = given
        begin = reverse("console:sso-begin", kwargs={"slug": configuration.organization.slug})
        return render(
            request,
            "console/sso/continue.html",
            {
                "organization": configuration.organization,
                "provider_host": urlsplit(configuration.issuer).netloc,
                "begin_url": f"{begin}?{urlencode({k: v for k, v in query.items() if v})}",
            },
        )

    def show(self, form, *, status=200):
        next_url = self.request.POST.get("next") or self.request.GET.get("next", "")
        return render(
            self.request,
            "console/sso/start.html",
            {"form": form, "next": next_url},
            status=status,
        )


def sso_begin(request, slug):
    """`/login/sso/<slug>/`: straight to the organization's provider (a link to bookmark)."""
    configuration = sso.sso_configuration_enabled(slug=slug)
    if configuration is None:
        return _failed(request, "not_configured", "This organization has no single sign-on.")
    next_url = request.GET.get("next", "")
    request.session[_NEXT_KEY] = next_url if _safe(request, next_url) else ""
    try:
        return oidc.authorization_redirect(
            request, configuration, login_hint=request.GET.get("login_hint", "")[:254]
        )
    except DomainError as error:
        return _failed(request, "discovery_failed", error.message, configuration=configuration)
    except SecretUnreadable as error:
        logger.error("sso: %s (organization %s)", error, configuration.organization.slug)
        return _failed(
            request,
            "secret_unreadable",
            "Single sign-on is misconfigured on this platform. Tell the platform operators.",
            configuration=configuration,
        )


def sso_callback(request, slug):
    """`/login/sso/<slug>/callback`: the provider sends the person back here with a code."""
    configuration = sso.sso_configuration_enabled(slug=slug)
    if configuration is None:
        return _failed(request, "not_configured", "This organization has no single sign-on.")
    try:
        claims = oidc.complete_sign_in(request, configuration)
        user = sso.sso_sign_in(configuration=configuration, claims=claims)
    except (oidc.SignInFailed, sso.SignInRefused) as error:
        return _failed(request, error.reason, error.message, configuration=configuration)
    except SecretUnreadable as error:
        logger.error("sso: %s (organization %s)", error, slug)
        return _failed(
            request,
            "secret_unreadable",
            "Single sign-on is misconfigured on this platform. Tell the platform operators.",
            configuration=configuration,
        )
    next_url = request.session.pop(_NEXT_KEY, "")
    # A new session key (Django's login), which acts for this organization only.
    login(request, user, backend=_BACKEND)
    organization = configuration.organization
    request.session[SESSION_SSO_ORGANIZATION_KEY] = organization.pk
    request.session[SESSION_ORGANIZATION_KEY] = organization.pk
    logger.info("sso: %s signed in to %s", user.email, organization.slug)
    return redirect(next_url if _safe(request, next_url) else "console:overview")


def _safe(request, url: str) -> bool:
    return bool(url) and url_has_allowed_host_and_scheme(
        url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )


def _failed(request, reason: str, message: str, *, configuration=None):
    organization = configuration.organization if configuration else None
    logger.warning(
        "sso: sign-in failed (%s) for %s", reason, organization.slug if organization else "-"
    )
    return render(
        request,
        "console/sso/failed.html",
        {"message": message, "reason": reason, "organization": organization},
        status=403 if reason in _REFUSALS else 400,
    )


# The provider said who the person is, and our rules refused them (403, not 400).
_REFUSALS = {"domain_not_allowed", "email_unverified", "email_taken", "inactive"}


class SingleSignOnSettingsView(ConsoleView):
    """`/settings/sso`: owners configure the identity provider; admins see it."""

    section = "settings"
    required_permissions = {"GET": Permission.SSO_READ, "POST": Permission.SSO_WRITE}

    def get(self, request):
        return self.show(self.form())

    def post(self, request):
        form = SingleSignOnForm(request.POST)
        if form.is_valid():
            try:
                sso.sso_configure(actor=request.actor, **form.service_arguments())
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(request, "Saved single sign-on.")
                return redirect("console:settings-sso")
        return self.show(form, status=400)

    def form(self):
        configuration = sso.sso_configuration_for(organization=self.request.actor.organization)
        if configuration is None:
            return SingleSignOnForm()
        return SingleSignOnForm(
            initial={
                "issuer": configuration.issuer,
                "client_id": configuration.client_id,
                "allowed_email_domains": ", ".join(configuration.allowed_email_domains),
                "default_role": configuration.default_role,
                "enabled": configuration.enabled,
                "password_login_enabled": configuration.password_login_enabled,
            }
        )

    def show(self, form, *, status=200):
        organization = self.request.actor.organization
        return self.render(
            "console/settings/sso.html",
            {
                "form": form,
                "configuration": sso.sso_configuration_for(organization=organization),
                "redirect_uri": oidc.redirect_uri(organization.slug),
                "start_url": self.request.build_absolute_uri(
                    reverse("console:sso-begin", kwargs={"slug": organization.slug})
                ),
            },
            status=status,
        )


class SingleSignOnRemoveView(ConsoleView):
    section = "settings"
    required_permissions = {"POST": Permission.SSO_WRITE}

    def post(self, request):
        try:
            sso.sso_remove(actor=request.actor)
        except DomainError as error:
            messages.error(request, error.message)
        else:
            messages.success(request, "Removed single sign-on: members sign in with passwords.")
        return redirect("console:settings-sso")
