"""Billing's tables: the usage ledger and its rollups, spend and budgets, invoices, Stripe.

The ledger (UsageRecord, DedicatedUsageRecord) holds facts: rows are only ever inserted, never
changed or deleted (the model and its queryset refuse, and on PostgreSQL a trigger does too).
Ids of other apps' objects are plain columns, not foreign keys: a ledger row must outlive the
key, deployment or model version it mentions, and a batch insert must never fail on one of them.
Amounts are Decimal; unrounded ones carry 16 places, rounded ones the currency's minor unit.
"""

import uuid
from decimal import Decimal

from django.db import models
from django.db.models import Q

from billing.money import MAX_EXPONENT
from billing.rating import AMOUNT_PLACES


class ImmutableRowError(Exception):
    """Raised on an attempt to change or delete a row that is a financial record."""


class _AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise ImmutableRowError(f"{self.model.__name__} rows are immutable")

    def delete(self):
        raise ImmutableRowError(f"{self.model.__name__} rows are immutable")


class _AppendOnlyModel(models.Model):
    objects = _AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableRowError(f"{type(self).__name__} rows are immutable")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableRowError(f"{type(self).__name__} rows are immutable")


def _amount_field(**kwargs):
    return models.DecimalField(max_digits=34, decimal_places=AMOUNT_PLACES, **kwargs)


def _price_field(**kwargs):
    return models.DecimalField(max_digits=20, decimal_places=8, **kwargs)


def _money_field(**kwargs):
    """A rounded amount: any currency's minor unit fits in MAX_EXPONENT places."""
    return models.DecimalField(
        max_digits=18, decimal_places=MAX_EXPONENT, default=Decimal(0), **kwargs
    )


class BillingPeriod(models.Model):
    """A billing period of the platform (every organization shares the calendar).

    Its row is also the lock between ingestion and closing: ingestion holds it FOR SHARE while it
    writes usage into the period; closing takes it FOR UPDATE to mark it `closing`, after which
    late usage goes to the period that is open then, so a closed invoice never misses a row.
    """

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CLOSING = "closing", "Closing"
        CLOSED = "closed", "Closed"

    start = models.DateTimeField(unique=True)
    end = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    closing_started_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-start"]

    def __str__(self):
        return f"{self.start:%Y-%m-%d}..{self.end:%Y-%m-%d} ({self.status})"


class UsageRecord(_AppendOnlyModel):
    """One serverless or dedicated request's tokens, rated with the price in force then.

    Exactly one row per gateway request (unique request_id). `period_start` is the billing
    period the row is invoiced in: the period of `occurred_at`, or the next open one for usage
    that arrived after its own period had closed.
    """

    # The primary key: one index less to maintain on the largest table.
    request_id = models.CharField(max_length=128, primary_key=True)
    # No database constraint: PostgreSQL would check every inserted row at commit (a deferred
    # trigger per row, a large share of an ingestion batch); ingestion looks the organizations
    # up anyway, and Django's PROTECT still refuses to delete an organization with usage.
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    period_start = models.DateTimeField()
    occurred_at = models.DateTimeField(help_text="When the request finished.")
    api_key_id = models.BigIntegerField(null=True, blank=True)
    # The caller's project; null on rows ingested before projects existed, which were all the
    # default project's (reports read null as the organization's default project).
    project_id = models.BigIntegerField(null=True, blank=True)
    end_user = models.CharField(max_length=256, null=True, blank=True)
    tags = models.JSONField(null=True, blank=True)
    deployment_id = models.UUIDField(null=True, blank=True)
    model_version_id = models.BigIntegerField(null=True, blank=True)
    deployment_type = models.CharField(max_length=16, blank=True)
    model = models.CharField(max_length=200, help_text="The model name as the caller sent it.")
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    cached_tokens = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3)
    token_price_id = models.BigIntegerField(
        null=True, blank=True, help_text="The catalog price used; empty when none was in force."
    )
    input_price_per_million = _price_field()
    output_price_per_million = _price_field()
    # The price of its cached prompt tokens; empty: they cost the input price (no discount in
    # force, or rated before cached prices existed). amount = ((input - cached) x input price
    # + cached x cached price + output x output price) / 1M.
    cached_input_price_per_million = _price_field(null=True, blank=True)
    amount = _amount_field()
    # A partner-hosted model's request: the provider connection that served it and what the
    # provider charges us for it (the catalog's ProviderCost in force when it finished, in the
    # provider's currency; 0 and "" when none was), for the operators' margin report.
    provider_connection_id = models.BigIntegerField(null=True, blank=True)
    provider_cost_id = models.BigIntegerField(null=True, blank=True)
    provider_currency = models.CharField(max_length=3, blank=True, default="")
    provider_cost = _amount_field(default=0)
    ingested_at = models.DateTimeField()

    class Meta:
        # Closing reads a period; the live draft one organization's part of it.
        indexes = [
            models.Index(fields=["period_start", "organization"], name="usage_record_period_org")
        ]

    def __str__(self):
        return f"{self.request_id}: {self.input_tokens}+{self.output_tokens} = {self.amount}"


class DedicatedUsageRecord(_AppendOnlyModel):
    """Seconds one dedicated replica ran inside one UTC day, at one price.

    Cut from the deployments' ReplicaUsage intervals at midnights, price changes and (while the
    replica still runs) whole hours; boundaries are whole seconds, so the seconds of all the
    segments of an interval add up to the interval. The amount is seconds x price per hour /
    3600, computed per invoice line: it is rarely a finite decimal.
    """

    replica_usage_id = models.BigIntegerField()
    start = models.DateTimeField()
    end = models.DateTimeField()
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="+"
    )
    period_start = models.DateTimeField()
    deployment_id = models.UUIDField()
    # The deployment's project (null on rows from before projects: the default project's).
    project_id = models.BigIntegerField(null=True, blank=True)
    model_version_id = models.BigIntegerField(null=True, blank=True)
    hardware_profile_id = models.BigIntegerField()
    gpu_count = models.PositiveSmallIntegerField()
    replica_name = models.CharField(max_length=200)
    seconds = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    dedicated_price_id = models.BigIntegerField(
        null=True, blank=True, help_text="Empty: the hardware profile's list price was used."
    )
    price_per_hour = _price_field(help_text="Per replica-hour of the hardware profile.")
    ingested_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["replica_usage_id", "start"], name="unique_dedicated_segment"
            )
        ]
        indexes = [
            models.Index(fields=["organization", "period_start"], name="dedicated_org_period"),
        ]

    def __str__(self):
        return f"replica usage {self.replica_usage_id} {self.start:%Y-%m-%d %H:%M} +{self.seconds}s"


class ReplicaUsageCursor(models.Model):
    """How far a ReplicaUsage interval has been cut into the ledger; `complete` once it ended
    and all of it is in."""

    replica_usage_id = models.BigIntegerField(primary_key=True)
    billed_until = models.DateTimeField()
    complete = models.BooleanField(default=False)

    def __str__(self):
        return f"replica usage {self.replica_usage_id} billed until {self.billed_until}"


class UsageRollup(models.Model):
    """Token usage summed per period x day x organization x model version x deployment x key x
    price, maintained in the same transaction that inserts the ledger rows (integer sums, so it
    is exact on every database). Tests prove it always equals the ledger.

    Missing ids are 0 (key, model version) or "" (deployment) rather than NULL, so that the
    unique key works as an upsert target on SQLite and PostgreSQL alike.
    """

    period_start = models.DateTimeField()
    day = models.DateField()
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,  # as UsageRecord's
    )
    model_version_id = models.BigIntegerField()
    deployment_id = models.CharField(max_length=36)
    api_key_id = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    input_price_per_million = _price_field()
    output_price_per_million = _price_field()
    # The ledger's cached price, or its input price where it has none (never empty: a unique
    # key column).
    cached_input_price_per_million = _price_field(default=Decimal(0))
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                # Organization and day first: the usage report's range scan uses this index.
                fields=[
                    "organization",
                    "day",
                    "period_start",
                    "model_version_id",
                    "deployment_id",
                    "api_key_id",
                    "currency",
                    "input_price_per_million",
                    "output_price_per_million",
                    "cached_input_price_per_million",
                ],
                name="unique_usage_rollup",
            )
        ]

    def __str__(self):
        return f"{self.organization_id} {self.day} {self.input_tokens}+{self.output_tokens}"


class PeriodSpend(models.Model):
    """An organization's rated spend in a period so far, kept current by ingestion so that the
    gateway's hard-limit check is one indexed read."""

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="+"
    )
    period_start = models.DateTimeField()
    currency = models.CharField(max_length=3)
    amount = _amount_field(default=Decimal(0))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "period_start"], name="unique_period_spend"
            )
        ]

    def __str__(self):
        return f"{self.organization_id} {self.period_start:%Y-%m-%d}: {self.amount}"


class ProjectPeriodSpend(models.Model):
    """A project's rated spend in a period so far (tokens its keys used, and its deployments'
    dedicated time), kept current by ingestion like PeriodSpend: the gateway's project budget
    check is one indexed read."""

    project = models.ForeignKey("accounts.Project", on_delete=models.CASCADE, related_name="+")
    period_start = models.DateTimeField()
    currency = models.CharField(max_length=3)
    amount = _amount_field(default=Decimal(0))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project", "period_start"], name="unique_project_period_spend"
            )
        ]

    def __str__(self):
        return f"project {self.project_id} {self.period_start:%Y-%m-%d}: {self.amount}"


class ProjectBudgetAlert(models.Model):
    """A project's budget threshold (50, 80 or 100 %) crossed in a period: emailed once to the
    organization's billing address and shown on the project's page."""

    project = models.ForeignKey(
        "accounts.Project", on_delete=models.CASCADE, related_name="budget_alerts"
    )
    period_start = models.DateTimeField()
    threshold_percent = models.PositiveSmallIntegerField()
    spend = _money_field()
    limit = _money_field()
    currency = models.CharField(max_length=3)
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start", "-threshold_percent"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "period_start", "threshold_percent"],
                name="unique_project_budget_alert",
            )
        ]

    def __str__(self):
        return f"project {self.project_id} reached {self.threshold_percent}% of its budget"


class BudgetAlert(models.Model):
    """A spend threshold (50, 80 or 100 % of the monthly limit) crossed in a period: emailed
    once, and shown as a banner in the console until the period ends."""

    THRESHOLDS = (50, 80, 100)

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="budget_alerts"
    )
    period_start = models.DateTimeField()
    threshold_percent = models.PositiveSmallIntegerField()
    spend = _money_field()
    limit = _money_field()
    currency = models.CharField(max_length=3)
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start", "-threshold_percent"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "period_start", "threshold_percent"],
                name="unique_budget_alert",
            )
        ]

    def __str__(self):
        return f"{self.organization_id} reached {self.threshold_percent}% of its limit"


class BillingAccount(models.Model):
    """The organization's side at the payment provider."""

    organization = models.OneToOneField(
        "accounts.Organization", on_delete=models.CASCADE, related_name="billing_account"
    )
    # Idempotency keys at Stripe derive from this, not from the row id, which another database
    # (a staging copy, a reset test database) sharing the Stripe account may reuse.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    stripe_customer_id = models.CharField(max_length=64, blank=True)

    def __str__(self):
        return f"{self.organization_id}: {self.stripe_customer_id or 'no Stripe customer'}"


class NumberSequence(models.Model):
    """A gapless counter (invoice numbers per year). Taken FOR UPDATE inside the transaction
    that uses the number, so a rolled-back finalization gives its number back."""

    name = models.CharField(max_length=64, unique=True)
    last_value = models.PositiveIntegerField(default=0)

    def __str__(self):
        return f"{self.name}: {self.last_value}"


class Invoice(models.Model):
    """A finalized invoice: immutable once written, except for its payment and Stripe status.

    Totals: each line rounded half-up to the minor unit; subtotal = sum of the usage lines;
    tax = tax_rate x subtotal, rounded; prepaid credits pay up to subtotal + tax; total is what
    is due. The tax and the credits also appear as lines, so every amount is on a line.
    """

    class PaymentStatus(models.TextChoices):
        UNPAID = "unpaid", "Unpaid"
        PAID = "paid", "Paid"
        PAYMENT_FAILED = "payment_failed", "Payment failed"
        NOTHING_DUE = "nothing_due", "Nothing due"

    class StripeStatus(models.TextChoices):
        DISABLED = "disabled", "Stripe off"
        PENDING = "pending", "Waiting to sync"
        FAILED = "failed", "Sync failed; retrying"
        SYNCED = "synced", "In Stripe"

    IMMUTABLE_FIELDS = (
        "organization_id",
        "number",
        "period_start",
        "period_end",
        "currency",
        "subtotal",
        "tax_rate",
        "tax",
        "credits_applied",
        "total",
        "finalized_at",
    )

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="invoices"
    )
    number = models.CharField(max_length=32, unique=True)
    # Stripe idempotency keys derive from this (see BillingAccount.uid).
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    currency = models.CharField(max_length=3)
    subtotal = _money_field()
    tax_rate = models.DecimalField(max_digits=7, decimal_places=6, default=Decimal(0))
    tax = _money_field()
    credits_applied = _money_field()
    total = _money_field()
    finalized_at = models.DateTimeField()
    payment_status = models.CharField(
        max_length=16, choices=PaymentStatus.choices, default=PaymentStatus.UNPAID
    )
    paid_at = models.DateTimeField(null=True, blank=True)
    stripe_status = models.CharField(
        max_length=16, choices=StripeStatus.choices, default=StripeStatus.DISABLED
    )
    stripe_invoice_id = models.CharField(max_length=64, blank=True)
    stripe_amount_due = models.BigIntegerField(
        null=True, blank=True, help_text="What Stripe says is due, in minor units."
    )
    stripe_attempts = models.PositiveIntegerField(default=0)
    stripe_last_error = models.TextField(blank=True)
    stripe_next_attempt_at = models.DateTimeField(null=True, blank=True)
    stripe_synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "period_start"], name="unique_invoice_per_period"
            )
        ]
        indexes = [models.Index(fields=["stripe_status"], name="invoice_stripe_status")]

    def __str__(self):
        return self.number

    def save(self, *args, **kwargs):
        if not self._state.adding:
            stored = type(self).objects.filter(pk=self.pk).values(*self.IMMUTABLE_FIELDS).first()
            if stored and any(stored[f] != getattr(self, f) for f in self.IMMUTABLE_FIELDS):
                raise ImmutableRowError(
                    f"invoice {self.number} is finalized; correct it with a credit note"
                )
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableRowError("invoices are never deleted; correct them with a credit note")


class InvoiceLine(_AppendOnlyModel):
    """One line of an invoice. Usage lines trace to the ledger by (model version, price) or
    (deployment, hardware profile, price) within the invoice's organization and period."""

    class Kind(models.TextChoices):
        INPUT_TOKENS = "input_tokens", "Input tokens"
        CACHED_INPUT_TOKENS = "cached_input", "Cached input tokens"
        OUTPUT_TOKENS = "output_tokens", "Output tokens"
        # An embedding model's input tokens (/v1/embeddings), at its version's input price.
        EMBEDDING_TOKENS = "embedding_tokens", "Embedding tokens"
        DEDICATED = "dedicated", "Dedicated GPU time"
        # What a private offer's committed spend asks beyond the period's use of the model.
        COMMITMENT = "commitment", "Committed spend shortfall"
        TAX = "tax", "Tax"
        CREDITS = "credits", "Prepaid credits"

    USAGE_KINDS = (
        Kind.INPUT_TOKENS,
        Kind.CACHED_INPUT_TOKENS,
        Kind.OUTPUT_TOKENS,
        Kind.EMBEDDING_TOKENS,
        Kind.DEDICATED,
        Kind.COMMITMENT,
    )

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="lines")
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.CharField(max_length=300)
    model_version_id = models.BigIntegerField(null=True, blank=True)
    deployment_id = models.UUIDField(null=True, blank=True)
    hardware_profile_id = models.BigIntegerField(null=True, blank=True)
    quantity = models.DecimalField(max_digits=28, decimal_places=6)
    unit = models.CharField(max_length=32, blank=True)
    unit_price = _price_field()
    amount_exact = _amount_field(help_text="Before rounding.")
    amount = _money_field()
    # Seconds of dedicated time, tokens otherwise: the integer the ledger sums to.
    ledger_quantity = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["invoice", "position"]
        constraints = [
            models.UniqueConstraint(fields=["invoice", "position"], name="unique_invoice_line")
        ]

    def __str__(self):
        return f"{self.invoice_id}#{self.position} {self.description}: {self.amount}"


class StripeInvoiceItem(models.Model):
    """The Stripe invoice item made for an invoice line (lines themselves never change)."""

    line = models.OneToOneField(InvoiceLine, on_delete=models.PROTECT, related_name="stripe_item")
    stripe_invoice_item_id = models.CharField(max_length=64)

    def __str__(self):
        return self.stripe_invoice_item_id


class CreditGrant(models.Model):
    """Prepaid credit an operator granted an organization; invoices draw on it at close."""

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="credit_grants"
    )
    currency = models.CharField(max_length=3)
    amount = _money_field()
    remaining = _money_field()
    description = models.CharField(max_length=200)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(remaining__gte=0) & Q(remaining__lte=models.F("amount")),
                name="credit_grant_remaining_in_range",
            )
        ]

    def __str__(self):
        return f"{self.amount} {self.currency} for {self.organization_id} ({self.remaining} left)"


class CreditApplication(_AppendOnlyModel):
    """How much of a grant an invoice used."""

    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="applications")
    invoice = models.ForeignKey(
        Invoice, on_delete=models.PROTECT, related_name="credit_applications"
    )
    amount = _money_field()

    def __str__(self):
        return f"{self.amount} of grant {self.grant_id} on invoice {self.invoice_id}"


class CreditNote(_AppendOnlyModel):
    """A correction of a finalized invoice: it reduces what the invoice asks for, never edits it."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_notes")
    number = models.CharField(max_length=32, unique=True)
    amount = _money_field()
    reason = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.number} ({self.amount}) for {self.invoice_id}"


class StripeEvent(models.Model):
    """A webhook event we handled, by Stripe's event id: a redelivery is acknowledged, not redone."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    invoice = models.ForeignKey(
        Invoice, null=True, blank=True, on_delete=models.SET_NULL, related_name="stripe_events"
    )
    received_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.event_id} {self.type}"


# --- publishers (issue 18) ------------------------------------------------------------------


class RevenueShare(models.Model):
    """A publisher's share of one listing's revenue, in percent, from the start of a billing
    period on: one share per model per statement, so a statement line is revenue x share."""

    listing = models.ForeignKey(
        "catalog.Listing", on_delete=models.CASCADE, related_name="revenue_shares"
    )
    percent = models.DecimalField(max_digits=5, decimal_places=2)
    effective_from = models.DateTimeField(help_text="The start of a billing period.")
    created_at = models.DateTimeField(auto_now_add=True)
    created_by_label = models.CharField(max_length=200)

    class Meta:
        ordering = ["listing", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["listing", "effective_from"], name="unique_revenue_share_start"
            ),
            models.CheckConstraint(
                condition=Q(percent__gte=0) & Q(percent__lte=100),
                name="revenue_share_is_a_percentage",
            ),
        ]

    def __str__(self):
        return f"{self.listing_id}: {self.percent} % from {self.effective_from:%Y-%m-%d}"


class PublisherStatement(models.Model):
    """What a publisher earned in a period, in one currency: made at period close from the
    finalized invoices' lines of its models (so its revenue is the invoices' to the cent),
    immutable once written (like an invoice) except for its payout's progress.

    Totals: revenue = sum of the usage lines' revenue; share = sum of the lines' shares (each
    revenue x percent, rounded half-up); adjustments = the publisher's part of credit notes
    issued in the period (negative lines); total = share + adjustments, what is paid out.
    """

    class PayoutStatus(models.TextChoices):
        NOT_DUE = "not_due", "Nothing to pay"
        PENDING = "pending", "Payout waiting"
        FAILED = "failed", "Payout failed; retrying"
        TRANSFERRED = "transferred", "Transfer created"
        PAID = "paid", "Paid"
        REVERSED = "reversed", "Transfer reversed"

    IMMUTABLE_FIELDS = (
        "publisher_id",
        "number",
        "period_start",
        "period_end",
        "currency",
        "revenue",
        "share",
        "adjustments",
        "total",
        "finalized_at",
    )

    publisher = models.ForeignKey(
        "catalog.Publisher", on_delete=models.PROTECT, related_name="statements"
    )
    number = models.CharField(max_length=32, unique=True)
    # Stripe idempotency keys derive from this (see BillingAccount.uid).
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    currency = models.CharField(max_length=3)
    revenue = _money_field()
    share = _money_field()
    adjustments = _money_field()
    total = _money_field()
    finalized_at = models.DateTimeField()
    payout_status = models.CharField(
        max_length=16, choices=PayoutStatus.choices, default=PayoutStatus.NOT_DUE
    )
    stripe_transfer_id = models.CharField(max_length=64, blank=True)
    payout_attempts = models.PositiveIntegerField(default=0)
    payout_last_error = models.TextField(blank=True)
    payout_next_attempt_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start", "publisher", "currency"]
        constraints = [
            models.UniqueConstraint(
                fields=["publisher", "period_start", "currency"],
                name="unique_statement_per_period",
            )
        ]

    def __str__(self):
        return self.number

    def save(self, *args, **kwargs):
        if not self._state.adding:
            stored = type(self).objects.filter(pk=self.pk).values(*self.IMMUTABLE_FIELDS).first()
            if stored and any(stored[f] != getattr(self, f) for f in self.IMMUTABLE_FIELDS):
                raise ImmutableRowError(f"statement {self.number} is final")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableRowError("statements are never deleted")


class StatementLine(_AppendOnlyModel):
    """One line of a statement: a model version's usage in the period (tokens, GPU time, the
    revenue its invoice lines add up to, the share), or an adjustment from a credit note."""

    class Kind(models.TextChoices):
        USAGE = "usage", "Usage"
        ADJUSTMENT = "adjustment", "Credit note adjustment"

    statement = models.ForeignKey(
        PublisherStatement, on_delete=models.PROTECT, related_name="lines"
    )
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.CharField(max_length=300)
    model_version_id = models.BigIntegerField(null=True, blank=True)
    credit_note_id = models.BigIntegerField(null=True, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    gpu_seconds = models.BigIntegerField(default=0, help_text="GPU-seconds of dedicated time.")
    customers = models.PositiveIntegerField(default=0, help_text="Organizations billed.")
    revenue = _money_field(help_text="The customers' invoice lines (a credit: negative).")
    share_percent = models.DecimalField(max_digits=5, decimal_places=2)
    share = _money_field()

    class Meta:
        ordering = ["statement", "position"]
        constraints = [
            models.UniqueConstraint(fields=["statement", "position"], name="unique_statement_line")
        ]

    def __str__(self):
        return f"{self.statement_id}#{self.position} {self.description}: {self.share}"
