"""The operators' admin for the catalog. Publishing, deprecating and pricing go through the same
services as the REST API (so they are checked and audited); weights come in by catalog_import."""

from django import forms
from django.contrib import admin, messages

from accounts.actors import Actor
from accounts.roles import Role
from accounts.services import audit_record
from catalog import providers, services
from catalog.models import (
    DedicatedPrice,
    HardwareProfile,
    Model,
    ModelArtifact,
    ModelVersion,
    ProviderConnection,
    ServingRuntime,
    TermsAcceptance,
    TermsOfUse,
    TokenPrice,
)
from controlplane.errors import DomainError


def _actor(request) -> Actor:
    return Actor(organization=None, role=Role.OWNER, user=request.user)


@admin.register(ServingRuntime)
class ServingRuntimeAdmin(admin.ModelAdmin):
    list_display = ["name", "display_name", "image", "device", "port", "health_path"]


@admin.register(HardwareProfile)
class HardwareProfileAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "display_name",
        "gpu_model",
        "gpu_count",
        "gpu_memory_gb",
        "cpu_request",
        "memory_request",
        "price_per_hour",
        "currency",
        "is_active",
    ]
    list_filter = ["is_active", "gpu_model"]
    search_fields = ["name", "display_name", "gpu_model"]


class ModelVersionInline(admin.TabularInline):
    model = ModelVersion
    extra = 0
    fields = ["version", "status", "dtype", "serving_runtime", "size_bytes", "artifact_uri"]
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = [
        "slug",
        "display_name",
        "publisher",
        "architecture",
        "context_length",
        "total_parameters",
        "visibility",
        "organization",
    ]
    list_filter = ["architecture", "visibility", "publisher", "license"]
    search_fields = ["slug", "display_name", "publisher", "family"]
    autocomplete_fields = ["organization"]
    inlines = [ModelVersionInline]

    def save_model(self, request, obj, form, change):
        # The form already ran the model's validation and constraints; record who changed what.
        super().save_model(request, obj, form, change)
        audit_record(
            actor=_actor(request),
            action="catalog.model.update" if change else "catalog.model.create",
            target=obj,
            changes={"fields": sorted(form.changed_data)},
        )


class ModelArtifactInline(admin.TabularInline):
    model = ModelArtifact
    extra = 0
    fields = ["path", "size_bytes", "sha256"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class TokenPriceInline(admin.TabularInline):
    model = TokenPrice
    extra = 0
    fields = [
        "currency",
        "input_per_million",
        "cached_input_per_million",
        "output_per_million",
        "effective_from",
    ]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # prices are added by action or API: never edited, so history stays true


class DedicatedPriceInline(TokenPriceInline):
    model = DedicatedPrice
    fields = ["hardware_profile", "currency", "per_hour", "effective_from"]
    readonly_fields = fields


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "status",
        "dtype",
        "serving_runtime",
        "size_bytes",
        "min_gpu_memory_gb",
        "published_at",
    ]
    list_filter = ["status", "serving_runtime", "dtype"]
    search_fields = ["model__slug", "version"]
    readonly_fields = [
        "status",
        "artifact_uri",
        "required_memory_gb",
        "min_gpu_memory_gb",
        "published_at",
        "deprecated_at",
    ]
    inlines = [ModelArtifactInline, TokenPriceInline, DedicatedPriceInline]
    actions = ["publish", "deprecate"]

    def has_change_permission(self, request, obj=None):
        # Published versions are what deployments run; they change only by status actions.
        if obj is not None and obj.status != ModelVersion.Status.DRAFT:
            return False
        return super().has_change_permission(request, obj)

    @admin.action(description="Publish the selected versions")
    def publish(self, request, queryset):
        self._apply(request, queryset, services.model_version_publish, "published")

    @admin.action(description="Deprecate the selected versions")
    def deprecate(self, request, queryset):
        self._apply(request, queryset, services.model_version_deprecate, "deprecated")

    def _apply(self, request, queryset, service, verb):
        done = 0
        for version in queryset:
            try:
                service(actor=_actor(request), version=version)
                done += 1
            except DomainError as error:
                self.message_user(request, f"{version}: {error.message}", messages.ERROR)
        if done:
            self.message_user(request, f"{done} version(s) {verb}.", messages.SUCCESS)


class ProviderConnectionForm(forms.ModelForm):
    """The credential is typed in, never shown: the field starts empty, and leaving it empty
    keeps the stored one."""

    base_url = forms.CharField(max_length=300, help_text="http:// or https:// only.")
    credential = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="The provider's API key. Stored encrypted; leave empty to keep the current one.",
    )

    class Meta:
        model = ProviderConnection
        fields = [
            "name",
            "display_name",
            "kind",
            "base_url",
            "requests_per_minute",
            "tokens_per_minute",
            "tenant_share_percent",
            "timeout_seconds",
            "is_active",
        ]


@admin.register(ProviderConnection)
class ProviderConnectionAdmin(admin.ModelAdmin):
    form = ProviderConnectionForm
    list_display = ["name", "kind", "base_url", "has_credential", "is_active"]
    list_filter = ["kind", "is_active"]

    @admin.display(boolean=True)
    def has_credential(self, connection):
        return connection.has_credential

    def get_readonly_fields(self, request, obj=None):
        return ["name", "kind"] if obj is not None else []

    def save_model(self, request, obj, form, change):
        # Through the services, so the URL and kind are checked and the change audited.
        data = {
            name: form.cleaned_data[name]
            for name in form.cleaned_data
            if name not in ("name", "kind", "credential")
        }
        credential = form.cleaned_data.get("credential") or None
        try:
            if change:
                connection = ProviderConnection.objects.get(pk=obj.pk)
                providers.provider_connection_update(
                    actor=_actor(request), connection=connection, credential=credential, **data
                )
            else:
                created = providers.provider_connection_create(
                    actor=_actor(request),
                    name=obj.name,
                    kind=obj.kind,
                    credential=credential,
                    **data,
                )
                obj.pk = created.pk
        except DomainError as error:
            self.message_user(request, error.message, level=messages.ERROR)


@admin.register(TermsOfUse)
class TermsOfUseAdmin(admin.ModelAdmin):
    list_display = ["model_version", "version", "title", "effective_from"]
    readonly_fields = ["created_at"]


@admin.register(TermsAcceptance)
class TermsAcceptanceAdmin(admin.ModelAdmin):
    list_display = ["organization", "terms", "accepted_by_label", "accepted_at"]
    readonly_fields = ["terms", "organization", "accepted_by", "accepted_by_label", "accepted_at"]

    def has_add_permission(self, request):
        return False
