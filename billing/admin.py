"""Operators' view of billing. Financial records are read-only here: invoices change only
through credit notes, credits only through grants (both made by services)."""

from django.contrib import admin

from accounts.actors import Actor
from accounts.roles import Role
from billing.models import (
    BillingPeriod,
    BudgetAlert,
    CreditGrant,
    CreditNote,
    Invoice,
    InvoiceLine,
    StripeEvent,
)
from billing.services import credit_grant_create


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    fields = ["position", "kind", "description", "quantity", "unit", "unit_price", "amount"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class CreditNoteInline(InvoiceLineInline):
    model = CreditNote
    fields = ["number", "amount", "reason", "created_by", "created_at"]
    readonly_fields = fields


@admin.register(Invoice)
class InvoiceAdmin(_ReadOnly):
    list_display = [
        "number",
        "organization",
        "period_start",
        "total",
        "currency",
        "payment_status",
        "stripe_status",
    ]
    list_filter = ["payment_status", "stripe_status", "currency"]
    search_fields = ["number", "organization__slug", "stripe_invoice_id"]
    inlines = [InvoiceLineInline, CreditNoteInline]


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin):
    list_display = ["organization", "amount", "remaining", "currency", "expires_at", "created_at"]
    search_fields = ["organization__slug", "description"]
    fields = ["organization", "amount", "description", "expires_at"]

    def get_readonly_fields(self, request, obj=None):
        return self.fields if obj else []

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if change:
            return
        grant = credit_grant_create(
            actor=Actor(organization=obj.organization, role=Role.OWNER, user=request.user),
            organization=obj.organization,
            amount=obj.amount,
            description=obj.description,
            expires_at=obj.expires_at,
        )
        obj.pk = grant.pk


@admin.register(BudgetAlert)
class BudgetAlertAdmin(_ReadOnly):
    list_display = ["organization", "period_start", "threshold_percent", "spend", "limit"]


@admin.register(BillingPeriod)
class BillingPeriodAdmin(_ReadOnly):
    list_display = ["start", "end", "status", "closed_at"]


@admin.register(StripeEvent)
class StripeEventAdmin(_ReadOnly):
    list_display = ["event_id", "type", "invoice", "received_at"]
