"""Operators' view of usage events: read-only (only the gateway writes them, only billing marks
them ingested), found by the gateway's request id or a client's correlation id."""

from django.contrib import admin

from metering.models import UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = [
        "request_id",
        "client_request_id",
        "organization_id",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "usage_source",
        "status_code",
        "started_at",
    ]
    list_filter = ["usage_source", "status_code"]
    # Exact matches (`=`): the unique request_id and the client id's index serve them.
    search_fields = ["=request_id", "=client_request_id"]
    show_full_result_count = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
