from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from accounts import services
from accounts.actors import Actor
from accounts.models import APIKey, AuditLogEntry, Membership, Organization, User
from accounts.roles import Role


def _operator(request, organization: Organization) -> Actor:
    return Actor(organization=organization, role=Role.OWNER, user=request.user)


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    ordering = ["email"]
    list_display = ["email", "full_name", "is_staff", "is_active", "date_joined"]
    search_fields = ["email", "full_name"]
    fieldsets = [
        (None, {"fields": ["email", "password", "full_name"]}),
        ("Permissions", {"fields": ["is_active", "is_staff", "is_superuser", "groups"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "password1", "password2"]})]

    # A deactivated or deleted person's keys die with their access (accounts.services).
    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            services.user_keys_revoke(actor_user=request.user, user=obj, reason="user.deactivate")

    def delete_model(self, request, obj):
        services.user_keys_revoke(actor_user=request.user, user=obj, reason="user.delete")
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for user in queryset:
            services.user_keys_revoke(actor_user=request.user, user=user, reason="user.delete")
        super().delete_queryset(request, queryset)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = [
        "slug",
        "name",
        "status",
        "currency",
        "max_gpus",
        "max_deployments",
        "monthly_spend_limit",
    ]
    list_filter = ["status", "currency"]
    search_fields = ["slug", "name", "billing_email"]
    inlines = [MembershipInline]

    def save_formset(self, request, form, formset, change):
        """Memberships edited here bind their keys as the member services do."""
        super().save_formset(request, form, formset, change)
        if formset.model is not Membership:
            return
        actor = _operator(request, form.instance)
        for membership in formset.deleted_objects:
            services.member_keys_bind(actor=actor, membership=membership, removed=True)
            services.member_removal_record(
                organization_id=membership.organization_id, user_id=membership.user_id
            )
        for membership, changed in formset.changed_objects:
            if "user" in changed:  # the row now names someone else: the old person left
                form = next(f for f in formset.forms if f.instance is membership)
                services.member_keys_bind(
                    actor=actor,
                    membership=Membership(
                        organization=form.instance.organization, user_id=form.initial["user"]
                    ),
                    removed=True,
                )
                services.member_removal_record(
                    organization_id=membership.organization_id, user_id=form.initial["user"]
                )
            if "role" in changed:
                services.member_keys_bind(actor=actor, membership=membership)
        for membership in formset.new_objects:
            services.member_removal_forget(
                organization_id=membership.organization_id, user_id=membership.user_id
            )


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "display_prefix",
        "organization",
        "scopes",
        "revoked_at",
        "last_used_at",
    ]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "organization__slug"]
    # The hash is never edited by hand; keys are made and revoked through the API or console.
    readonly_fields = ["prefix", "secret_hash", "created_by", "created_at", "last_used_at"]


@admin.register(AuditLogEntry)
class AuditLogEntryAdmin(admin.ModelAdmin):
    list_display = ["created_at", "organization", "actor_label", "action", "target_repr"]
    list_filter = ["action"]
    search_fields = ["actor_label", "target_repr", "request_id"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
