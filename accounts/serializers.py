from rest_framework import serializers

from accounts import oidc
from accounts.models import (
    APIKey,
    AuditLogEntry,
    Membership,
    Organization,
    Project,
    ProjectMembership,
    SingleSignOnConfiguration,
)
from accounts.roles import Role
from controlplane.rest.serializers import MoneyField, StrictSerializer


class OrganizationSerializer(serializers.ModelSerializer):
    billing_email = serializers.EmailField(read_only=True, allow_blank=True)

    class Meta:
        model = Organization
        fields = [
            "id",
            "slug",
            "name",
            "billing_email",
            "currency",
            "status",
            "max_gpus",
            "max_deployments",
            "monthly_spend_limit",
            "created_at",
        ]
        read_only_fields = fields


class OrganizationUpdateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200, required=False)
    billing_email = serializers.EmailField(required=False, allow_blank=True)
    currency = serializers.RegexField(
        r"^[A-Z]{3}$",
        required=False,
        error_messages={"invalid": "Use an ISO 4217 code such as USD."},
    )
    monthly_spend_limit = MoneyField(
        max_digits=14, decimal_places=2, min_value=0, required=False, allow_null=True
    )


def _allowed_models_field(help_text: str):
    return serializers.ListField(
        child=serializers.CharField(max_length=200),
        required=False,
        max_length=Project.MAX_ALLOWED_MODELS,
        help_text=help_text,
    )


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = [
            "id",
            "name",
            "description",
            "is_default",
            "rpm_limit",
            "tpm_limit",
            "monthly_budget",
            "allowed_models",
            "created_at",
        ]
        read_only_fields = fields


class ProjectCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100)
    description = serializers.CharField(max_length=300, required=False, allow_blank=True)
    rpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    monthly_budget = MoneyField(
        max_digits=14,
        decimal_places=2,
        min_value=0,
        required=False,
        allow_null=True,
        help_text="Hard monthly limit in the organization's currency (needs billing.write).",
    )
    allowed_models = _allowed_models_field(
        "Model names the project's keys may call; empty: every model of the organization."
    )


class ProjectUpdateSerializer(ProjectCreateSerializer):
    name = serializers.CharField(max_length=100, required=False)


class ProjectMemberSerializer(serializers.ModelSerializer):
    email = serializers.EmailField(source="user.email", read_only=True)
    full_name = serializers.CharField(source="user.full_name", read_only=True)

    class Meta:
        model = ProjectMembership
        fields = ["id", "email", "full_name", "role", "created_at"]
        read_only_fields = fields


class MembershipSerializer(serializers.ModelSerializer):
    email = serializers.EmailField(source="user.email", read_only=True)
    full_name = serializers.CharField(source="user.full_name", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "email", "full_name", "role", "created_at"]
        read_only_fields = fields


class MembershipCreateSerializer(StrictSerializer):
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices)


class MembershipUpdateSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=Role.choices)


class APIKeySerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(source="display_prefix", read_only=True)
    created_by = serializers.EmailField(
        source="created_by.email", read_only=True, default=None, allow_null=True
    )

    class Meta:
        model = APIKey
        fields = [
            "id",
            "name",
            "prefix",
            "scopes",
            "role",
            "project",
            "allowed_models",
            "rpm_limit",
            "tpm_limit",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields


class APIKeyCreatedSerializer(APIKeySerializer):
    """Returned once, by create: the only time the secret is ever shown."""

    key = serializers.CharField(
        read_only=True, help_text="The secret. Store it now: it is not shown again."
    )

    class Meta(APIKeySerializer.Meta):
        fields = [*APIKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class APIKeyCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=APIKey.Scope.choices),
        default=[APIKey.Scope.INFERENCE],
        allow_empty=False,
    )
    role = serializers.ChoiceField(choices=Role.choices, default=Role.DEVELOPER)
    rpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    project = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="The project's id (GET /api/v1/projects); empty: the default project.",
    )
    allowed_models = _allowed_models_field(
        "Model names this key may call, within its project's list; empty: all of them."
    )


class ProjectAPIKeyCreateSerializer(APIKeyCreateSerializer):
    project = None  # the project is the URL's


class APIKeyUpdateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100, required=False)
    allowed_models = _allowed_models_field(
        "Model names this key may call, within its project's list; empty: all of them."
    )


class AuditLogEntrySerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label", read_only=True)

    class Meta:
        model = AuditLogEntry
        fields = [
            "id",
            "created_at",
            "actor",
            "action",
            "target_type",
            "target_id",
            "target_repr",
            "changes",
            "request_id",
        ]
        read_only_fields = fields


class SingleSignOnSerializer(serializers.ModelSerializer):
    """An organization's single sign-on, as anyone may read it: never the client secret."""

    client_secret_set = serializers.SerializerMethodField(
        help_text="Whether a client secret is stored. The secret itself is never returned."
    )
    redirect_uri = serializers.SerializerMethodField(
        help_text="The redirect (callback) URI to register at the identity provider."
    )

    class Meta:
        model = SingleSignOnConfiguration
        fields = [
            "enabled",
            "issuer",
            "client_id",
            "client_secret_set",
            "allowed_email_domains",
            "default_role",
            "password_login_enabled",
            "redirect_uri",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_client_secret_set(self, configuration) -> bool:
        return bool(configuration.client_secret_encrypted)

    def get_redirect_uri(self, configuration) -> str:
        return oidc.redirect_uri(configuration.organization.slug)


class SingleSignOnWriteSerializer(StrictSerializer):
    enabled = serializers.BooleanField(required=False)
    issuer = serializers.URLField(max_length=500)
    client_id = serializers.CharField(max_length=255)
    client_secret = serializers.CharField(
        write_only=True,
        required=False,
        max_length=2000,
        style={"input_type": "password"},
        help_text="Needed the first time; leave it out to keep the stored one. Never returned.",
    )
    allowed_email_domains = serializers.ListField(
        child=serializers.RegexField(
            r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$", max_length=253
        ),
        min_length=1,
        max_length=50,
        help_text="Only people whose verified email is in one of these domains may sign in.",
    )
    default_role = serializers.ChoiceField(
        choices=[choice for choice in Role.choices if choice[0] != Role.OWNER], required=False
    )
    password_login_enabled = serializers.BooleanField(required=False)
