from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect

from accounts import selectors, services
from accounts.roles import Permission, Role
from console.forms import BudgetForm, MemberAddForm, MemberRoleForm, OrganizationProfileForm
from console.views.base import ConsoleView, apply_domain_error
from controlplane.errors import DomainError
from controlplane.mail import password_reset_by_mail_allowed


class OrganizationSettingsView(ConsoleView):
    """Profile, budget and members on one page. Each form posts to its own view; on an error
    that view renders this page again with the bound form, so nothing typed is lost."""

    section = "settings"
    required_permissions = {"GET": Permission.ORGANIZATION_READ}

    def get(self, request):
        return self.show()

    def show(self, *, status=200, **forms):
        organization = self.request.actor.organization
        context = {
            "profile_form": OrganizationProfileForm(
                initial={
                    "name": organization.name,
                    "billing_email": organization.billing_email,
                    "currency": organization.currency,
                }
            ),
            "budget_form": BudgetForm(
                initial={"monthly_spend_limit": organization.monthly_spend_limit}
            ),
            "member_form": MemberAddForm(),
            "members": selectors.membership_list(organization=organization),
            "roles": Role.choices,
            **forms,
        }
        return self.render("console/settings/organization.html", context, status=status)

    def save(self, form, form_name: str, write, success: str):
        """Validate `form`, call `write(cleaned_data)` (a service), and come back here."""
        if form.is_valid():
            try:
                write(form.cleaned_data)
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(self.request, success)
                return redirect("console:settings")
        return self.show(status=400, **{form_name: form})


class OrganizationProfileView(OrganizationSettingsView):
    required_permissions = {"POST": Permission.ORGANIZATION_WRITE}

    def post(self, request):
        return self.save(
            OrganizationProfileForm(request.POST),
            "profile_form",
            lambda data: services.organization_update(
                actor=request.actor, organization=request.actor.organization, **data
            ),
            "Saved the organization's profile.",
        )


class BudgetView(OrganizationSettingsView):
    required_permissions = {"POST": Permission.BILLING_WRITE}

    def post(self, request):
        return self.save(
            BudgetForm(request.POST),
            "budget_form",
            lambda data: services.organization_update(
                actor=request.actor, organization=request.actor.organization, **data
            ),
            "Saved the monthly spend limit.",
        )


class MemberAddView(OrganizationSettingsView):
    required_permissions = {"POST": Permission.MEMBERS_WRITE}

    def post(self, request):
        form = MemberAddForm(request.POST)
        return self.save(
            form,
            "member_form",
            lambda data: services.member_add(actor=request.actor, **data),
            f"Added {request.POST.get('email', '').strip().lower()} to the organization. "
            + (
                "A new user sets a password with “Forgot your password?” on the login page."
                if password_reset_by_mail_allowed()
                else "This installation sends no mail: a new user needs a platform operator "
                "to set their password."
            ),
        )


class MemberRoleView(OrganizationSettingsView):
    """A role picker on each member's row: errors come back as a message above the table."""

    required_permissions = {"POST": Permission.MEMBERS_WRITE}

    def post(self, request, pk):
        membership = self.membership(pk)
        form = MemberRoleForm(request.POST)
        if not form.is_valid():
            messages.error(request, "Choose one of the listed roles.")
            return redirect("console:settings")
        role = form.cleaned_data["role"]
        return self.attempt(
            lambda: services.member_update_role(
                actor=request.actor, membership=membership, role=role
            ),
            f"{membership.user.email} is now {Role(role).label}.",
        )

    def membership(self, pk):
        return get_object_or_404(
            selectors.membership_list(organization=self.request.actor.organization), pk=pk
        )

    def attempt(self, write, success: str):
        try:
            write()
        except DomainError as error:
            messages.error(self.request, error.message)
        else:
            messages.success(self.request, success)
        return redirect("console:settings")


class MemberRemoveView(MemberRoleView):
    def post(self, request, pk):
        membership = self.membership(pk)
        return self.attempt(
            lambda: services.member_remove(actor=request.actor, membership=membership),
            f"Removed {membership.user.email} from the organization; the API keys they made "
            "here are revoked.",
        )
