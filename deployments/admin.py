from django.contrib import admin

from deployments.models import Deployment, DeploymentEvent, Replica, ReplicaUsage


class ReplicaInline(admin.TabularInline):
    model = Replica
    extra = 0
    can_delete = False
    readonly_fields = ["name", "endpoint", "ready", "phase", "message", "restart_count"]
    fields = readonly_fields


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    """Read-mostly: changes go through the API (services), which check quotas and reconcile."""

    list_display = [
        "name",
        "organization",
        "type",
        "model_version",
        "hardware_profile",
        "status",
        "ready_replicas",
        "desired_replicas",
        "created_at",
    ]
    list_filter = ["status", "type"]
    search_fields = ["name", "organization__slug"]
    readonly_fields = [field.name for field in Deployment._meta.fields]
    inlines = [ReplicaInline]

    def has_add_permission(self, request):
        return False


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(admin.ModelAdmin):
    list_display = ["time", "deployment", "type", "reason", "message"]
    list_filter = ["type", "reason"]
    readonly_fields = ["deployment", "time", "type", "reason", "message"]


@admin.register(ReplicaUsage)
class ReplicaUsageAdmin(admin.ModelAdmin):
    list_display = [
        "deployment",
        "model_version",
        "hardware_profile",
        "replica_name",
        "started_at",
        "ended_at",
    ]
    readonly_fields = list_display
