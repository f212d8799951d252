import logging

from django.contrib.auth import views as auth_views
from django.http import HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import Resolver404, resolve, reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts.permissions import SESSION_ORGANIZATION_KEY, SESSION_SSO_ORGANIZATION_KEY
from accounts.selectors import membership_list_for_user
from console.forms import LoginForm, SetPasswordLinkForm
from controlplane.mail import password_reset_by_mail_allowed

logger = logging.getLogger(__name__)


class LoginView(auth_views.LoginView):
    template_name = "console/login.html"
    authentication_form = LoginForm
    redirect_authenticated_user = True


class LogoutView(auth_views.LogoutView):
    """POST only (Django's rule): a link or an image tag cannot log anyone out."""


@require_POST
def switch_organization(request):
    """Act for another organization the person belongs to, and stay on the same kind of page."""
    if not request.user.is_authenticated:
        return redirect("console:login")
    try:
        organization_id = int(request.POST.get("organization", ""))
    except ValueError:
        return HttpResponseBadRequest("Choose an organization from the list.")
    memberships = membership_list_for_user(
        user=request.user, sso_organization_id=request.session.get(SESSION_SSO_ORGANIZATION_KEY)
    )
    if not memberships.filter(organization_id=organization_id).exists():
        return HttpResponseBadRequest("You are not a member of that organization.")
    request.session[SESSION_ORGANIZATION_KEY] = organization_id
    return redirect(_same_section(request, request.POST.get("next", "")))


def _same_section(request, next_url: str) -> str:
    # A page about one object (a deployment, an invoice) belongs to the old organization and
    # would be a 404 in the new one: such pages go back to the overview instead.
    if not url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return "console:overview"
    try:
        match = resolve(next_url.split("?", 1)[0])
    except Resolver404:
        return "console:overview"
    if match.namespace != "console" or match.kwargs:
        return "console:overview"
    return next_url


class PasswordResetView(auth_views.PasswordResetView):
    """How a member added by an owner or admin (who has no password yet) sets one, and how
    anyone who forgot theirs gets back in. The link goes to the email; nothing says whether
    the address has an account."""

    template_name = "console/password/reset_form.html"
    form_class = SetPasswordLinkForm
    email_template_name = "console/password/reset_email.txt"
    subject_template_name = "console/password/reset_subject.txt"
    success_url = reverse_lazy("console:password-reset-done")

    def dispatch(self, request, *args, **kwargs):
        # Without a mail server the link would be written to the log (the console backend),
        # where anyone who reads the log could take over any account, staff included.
        if not password_reset_by_mail_allowed():
            if request.method == "POST":
                logger.warning(
                    "password reset refused: EMAIL_BACKEND does not deliver mail "
                    "(set EMAIL_URL; `manage.py check --deploy` reports it)"
                )
            return render(request, "console/password/reset_unavailable.html", status=503)
        return super().dispatch(request, *args, **kwargs)


class PasswordResetDoneView(auth_views.PasswordResetDoneView):
    template_name = "console/password/reset_done.html"


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    template_name = "console/password/reset_confirm.html"
    success_url = reverse_lazy("console:password-reset-complete")


class PasswordResetCompleteView(auth_views.PasswordResetCompleteView):
    template_name = "console/password/reset_complete.html"
