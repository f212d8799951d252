"""Console forms check the shape of what was typed; the services check the rules.

A rule a service enforces (who may grant which role, quotas, prices) is never repeated here:
its domain error is shown on the form instead (`console.views.base.apply_domain_error`).
"""

from decimal import Decimal

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm
from django.core.exceptions import ValidationError

from accounts.models import APIKey
from accounts.roles import Role
from accounts.sso import sso_required_for


class LoginForm(AuthenticationForm):
    username = forms.EmailField(
        label="Email", widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"})
    )
    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": "That email and password do not match an account. Check both and retry.",
        "sso_required": "%(organization)s signs in through single sign-on only: continue "
        "with its identity provider below.",
    }

    # The organization whose single sign-on the person must use, when the form says so.
    sso_organization = None

    def clean(self):
        # Before the password is checked: a password that could reach nothing is not worth
        # checking (and a failure here must not count toward the account's lockout).
        email = self.cleaned_data.get("username")
        configuration = sso_required_for(email=email) if email else None
        if configuration is not None:
            self.sso_organization = configuration.organization
            raise ValidationError(
                self.error_messages["sso_required"],
                code="sso_required",
                params={"organization": configuration.organization.name},
            )
        return super().clean()


class SingleSignOnStartForm(forms.Form):
    """How the login page finds an organization's identity provider: by the email's domain, or
    by the organization's slug."""

    email_or_organization = forms.CharField(
        label="Work email or organization",
        max_length=254,
        widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "email"}),
        help_text="Your work email (ana@example.com) or your organization's short name.",
    )


class SetPasswordLinkForm(PasswordResetForm):
    """Django's reset form, also for people who have no password yet: a member an owner or
    admin added (accounts.services.member_add) starts with none, and sets it this way."""

    def get_users(self, email):
        return get_user_model()._default_manager.filter(email__iexact=email, is_active=True)


class APIKeyCreateForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="Something that tells you where it is used, such as “production backend”.",
    )
    scopes = forms.MultipleChoiceField(
        choices=APIKey.Scope.choices,
        initial=[APIKey.Scope.INFERENCE],
        widget=forms.CheckboxSelectMultiple,
        help_text="Inference calls the models (/v1); management drives the REST API (/api/v1).",
        error_messages={"required": "Choose at least one scope."},
    )
    role = forms.ChoiceField(
        choices=Role.choices,
        initial=Role.DEVELOPER,
        help_text="What a management key may do. You cannot grant more than your own role.",
    )
    rpm_limit = forms.IntegerField(
        label="Requests per minute", min_value=1, required=False, help_text="Empty: no limit."
    )
    tpm_limit = forms.IntegerField(
        label="Tokens per minute", min_value=1, required=False, help_text="Empty: no limit."
    )
    expires_at = forms.DateTimeField(
        label="Expires (UTC)",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
        help_text="Empty: never expires.",
    )


class PageForm(forms.Form):
    """A form that shares its page with others: ids carry the form's name so none collide."""

    id_prefix = ""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_id", f"{self.id_prefix}-%s")
        super().__init__(*args, **kwargs)


class OrganizationProfileForm(PageForm):
    id_prefix = "profile"

    name = forms.CharField(max_length=200)
    billing_email = forms.EmailField(
        required=False, help_text="Where invoices and budget alerts go."
    )
    currency = forms.RegexField(
        regex=r"^[A-Z]{3}$",
        max_length=3,
        error_messages={"invalid": "Use an ISO 4217 code such as USD or EUR."},
        help_text="Applies to invoices from the next billing period.",
    )


class BudgetForm(PageForm):
    id_prefix = "budget"

    monthly_spend_limit = forms.DecimalField(
        label="Monthly spend limit",
        max_digits=14,
        decimal_places=2,
        min_value=Decimal("0"),
        required=False,
        help_text="A hard limit: calls are refused once this month's spend reaches it. "
        "Empty: no limit.",
    )


class MemberAddForm(PageForm):
    id_prefix = "member"

    email = forms.EmailField()
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DEVELOPER)


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class DeployForm(forms.Form):
    """What `deployments.services.deployment_create` takes, plus the expected load that only
    the break-even estimate uses."""

    name = forms.CharField(
        max_length=63,
        help_text="Lowercase letters, digits and hyphens. It is the model name you call.",
    )
    version = forms.ChoiceField(widget=forms.HiddenInput)
    type = forms.ChoiceField(
        choices=[
            ("serverless", "Serverless: shared pool, pay per token"),
            ("dedicated", "Dedicated: your own replicas, pay per GPU-hour"),
        ],
        widget=forms.RadioSelect,
        initial="dedicated",
    )
    hardware_profile = forms.ChoiceField(
        required=False, label="Hardware profile", help_text="Dedicated only."
    )
    min_replicas = forms.IntegerField(
        min_value=0, initial=1, label="Minimum replicas", help_text="0 lets it scale to zero."
    )
    max_replicas = forms.IntegerField(min_value=1, initial=1, label="Maximum replicas")
    scale_to_zero_after_seconds = forms.IntegerField(
        min_value=60,
        required=False,
        label="Scale to zero after (seconds idle)",
        help_text="With minimum 0: stop every replica after this long without requests.",
    )
    requests_per_day = forms.IntegerField(
        min_value=0, initial=10_000, label="Expected requests a day", required=False
    )
    input_tokens = forms.IntegerField(
        min_value=0, initial=500, label="Input tokens a request", required=False
    )
    output_tokens = forms.IntegerField(
        min_value=0, initial=300, label="Output tokens a request", required=False
    )

    SERVICE_FIELDS = (
        "name",
        "version",
        "type",
        "hardware_profile",
        "min_replicas",
        "max_replicas",
        "scale_to_zero_after_seconds",
    )
    LOAD_FIELDS = ("requests_per_day", "input_tokens", "output_tokens")

    def __init__(self, *args, versions=(), profiles=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["version"].choices = [(v, v) for v in versions]
        self.fields["hardware_profile"].choices = [("", "—"), *profiles]

    def service_arguments(self) -> dict:
        data = {name: self.cleaned_data.get(name) for name in self.SERVICE_FIELDS}
        if data["type"] == "serverless":
            # The shared pool decides replicas; the service refuses a profile for serverless.
            return {"name": data["name"], "version": data["version"], "type": "serverless"}
        return data

    def load(self):
        from console.estimates import Load

        values = {name: (self.cleaned_data.get(name) or 0) for name in self.LOAD_FIELDS}
        return Load(**values)


class ScaleForm(forms.Form):
    min_replicas = forms.IntegerField(min_value=0, label="Minimum replicas")
    max_replicas = forms.IntegerField(min_value=1, label="Maximum replicas")


class FallbacksForm(forms.Form):
    fallbacks = forms.CharField(
        label="Fallbacks, in order",
        required=False,
        max_length=500,
        help_text="Names of your other deployments (or partner models you enabled), separated "
        "by commas; tried in order when this one fails before answering. Empty for none.",
    )

    def names(self) -> list[str]:
        raw = self.cleaned_data["fallbacks"].replace(",", " ")
        return raw.split()


class SingleSignOnForm(PageForm):
    """An organization's single sign-on settings. The client secret field is never filled in
    from the stored one (PasswordInput does not render a value)."""

    id_prefix = "sso"

    issuer = forms.URLField(
        max_length=500,
        assume_scheme="https",
        help_text="The identity provider's issuer URL, e.g. https://login.example.com/realms/acme.",
    )
    client_id = forms.CharField(label="Client ID", max_length=255)
    client_secret = forms.CharField(
        label="Client secret",
        required=False,
        max_length=2000,
        widget=forms.PasswordInput(attrs={"autocomplete": "off"}),
        help_text="Stored encrypted and never shown again. Leave empty to keep the stored one.",
    )
    allowed_email_domains = forms.CharField(
        label="Allowed email domains",
        max_length=5000,
        help_text="One or more, separated by spaces or commas: example.com, eu.example.com.",
    )
    default_role = forms.ChoiceField(
        label="Role of new members",
        choices=[choice for choice in Role.choices if choice[0] != Role.OWNER],
        initial=Role.VIEWER,
        help_text="People who sign in for the first time join with this role.",
    )
    enabled = forms.BooleanField(label="Enable single sign-on", required=False)
    password_login_enabled = forms.BooleanField(
        label="Members may also sign in with a password",
        required=False,
        initial=True,
        help_text="Untick to make single sign-on the only way into this organization.",
    )

    def service_arguments(self) -> dict:
        data = dict(self.cleaned_data)
        data["allowed_email_domains"] = [
            domain for domain in data["allowed_email_domains"].replace(",", " ").split() if domain
        ]
        if not data["client_secret"]:
            del data["client_secret"]
        return data


class EnableForm(forms.Form):
    """Enabling a partner-hosted model: the name to call it by, and the terms accepted."""

    name = forms.CharField(
        max_length=63,
        help_text="Lowercase letters, digits and hyphens. It is the model name you call.",
    )
    terms_version = forms.CharField(widget=forms.HiddenInput)
    accept = forms.BooleanField(
        required=True,
        label="I accept these terms of use for my organization",
        error_messages={"required": "Accept the terms to enable the model."},
    )
