"""Invoices: the live draft of the current period, closing a period, credit notes and credits.

Lines come straight from the ledger by GROUP BY in the database (integer token and second sums
per price); amounts are computed from those sums in Decimal and rounded once, on the line.
Closing is two-phase so that it is safe against concurrent ingestion and against being killed:
1. the period's row is marked `closing` (FOR UPDATE; waits for ingestion batches in flight,
   after which late usage goes to the next period), so the period's ledger stops changing;
2. each organization's invoice is finalized in its own transaction; one that exists is skipped.
Rerunning after a crash therefore produces the same invoices, each once, with gapless numbers.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Case, Count, F, Q, Sum, Value, When
from django.db.models.functions import Coalesce, Least
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import AuditLogEntry, Organization
from accounts.services import audit_entry
from billing.models import (
    BillingPeriod,
    CreditApplication,
    CreditGrant,
    DedicatedUsageRecord,
    Invoice,
    InvoiceLine,
    NumberSequence,
    UsageRecord,
)
from billing.money import format_money, round_money
from billing.periods import Period, period_containing, period_starting
from billing.rating import (
    MILLION,
    SECONDS_PER_HOUR,
    invoice_totals,
    rate_gpu_seconds,
    rate_tokens,
    stored_amount,
)
from billing.selectors import credit_grants_available
from billing.statements import statements_finalize
from controlplane.errors import ValidationFailed

_QUANTITY = Decimal("0.000001")


def tax_rate() -> Decimal:
    """BILLING_TAX_RATE as a fraction: "0.2" is 20 %."""
    try:
        rate = Decimal(str(settings.BILLING_TAX_RATE))
    except ArithmeticError:
        raise ImproperlyConfigured(
            f"BILLING_TAX_RATE={settings.BILLING_TAX_RATE!r} is not a decimal number"
        ) from None
    if not 0 <= rate < 1:
        raise ImproperlyConfigured("BILLING_TAX_RATE is a fraction: 0.2 means 20 %")
    return rate


@dataclass
class DraftLine:
    kind: str
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount_exact: Decimal
    amount: Decimal
    ledger_quantity: int = 0
    model_version_id: int | None = None
    deployment_id: UUID | None = None
    hardware_profile_id: int | None = None


@dataclass
class DraftInvoice:
    organization: Organization
    period: Period
    currency: str
    tax_rate: Decimal
    lines: list[DraftLine]
    subtotal: Decimal
    tax: Decimal
    credits_applied: Decimal
    total: Decimal
    credit_draws: list[tuple[CreditGrant, Decimal]] = field(default_factory=list)

    @property
    def all_lines(self) -> list[DraftLine]:
        """Usage lines, then tax and credits as lines of their own."""
        extra = []
        if self.tax:
            extra.append(
                DraftLine(
                    kind=InvoiceLine.Kind.TAX,
                    description=f"Tax ({(self.tax_rate * 100).normalize():f} %)",
                    quantity=Decimal(1),
                    unit="",
                    unit_price=self.tax,
                    amount_exact=self.tax,
                    amount=self.tax,
                )
            )
        if self.credits_applied:
            extra.append(
                DraftLine(
                    kind=InvoiceLine.Kind.CREDITS,
                    description="Prepaid credits applied",
                    quantity=Decimal(1),
                    unit="",
                    unit_price=-self.credits_applied,
                    amount_exact=-self.credits_applied,
                    amount=-self.credits_applied,
                )
            )
        return [*self.lines, *extra]


# --- Lines from the ledger -------------------------------------------------------------------


def token_groups(*, period_start: datetime, organization_id: int | None = None) -> list[dict]:
    """Token sums per organization x model version x price for a period (one GROUP BY). A
    row without a cached price groups with the input price as its cached price (its cached
    tokens cost the input price)."""
    records = UsageRecord.objects.filter(period_start=period_start)
    if organization_id is not None:
        records = records.filter(organization_id=organization_id)
    return list(
        records.annotate(
            cached_price=Coalesce("cached_input_price_per_million", "input_price_per_million"),
            # Cached tokens billed at the cached price (never more than the request's input).
            cached_billed=Case(
                When(
                    cached_input_price_per_million__isnull=False,
                    then=Least("cached_tokens", "input_tokens"),
                ),
                default=Value(0),
            ),
        )
        .values(
            "organization_id",
            "model_version_id",
            "currency",
            "input_price_per_million",
            "output_price_per_million",
            "cached_price",
        )
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cached_tokens=Sum("cached_billed"),
        )
        .order_by()
    )


def dedicated_groups(*, period_start: datetime, organization_id: int | None = None) -> list[dict]:
    """Replica-second sums per organization x deployment x model version x profile x price
    for a period: a deployment updated to another version has a line per version it ran."""
    records = DedicatedUsageRecord.objects.filter(period_start=period_start)
    if organization_id is not None:
        records = records.filter(organization_id=organization_id)
    return list(
        records.values(
            "organization_id",
            "deployment_id",
            "model_version_id",
            "hardware_profile_id",
            "gpu_count",
            "currency",
            "price_per_hour",
        )
        .annotate(seconds=Sum("seconds"))
        .order_by()
    )


def _versions(ids) -> tuple[dict[int, str], set[int]]:
    """Each version's name, and which of them are embedding models (their input tokens are
    invoiced as embedding tokens)."""
    from catalog.models import Model, ModelVersion

    names, embedding = {}, set()
    for version in ModelVersion.objects.filter(pk__in={i for i in ids if i}).select_related(
        "model"
    ):
        # A partner-hosted model's lines say who serves it: "mistral-large:24.11 (hosted by
        # Mistral AI)", lines of their own beside the self-hosted models'.
        names[version.pk] = (
            f"{version} (hosted by {version.model.publisher})"
            if version.model.is_partner
            else str(version)
        )
        tasks = version.model.tasks
        if Model.Task.EMBEDDINGS in tasks and Model.Task.CHAT not in tasks:
            embedding.add(version.pk)
    return names, embedding


def _deployment_names(ids) -> dict[UUID, str]:
    from deployments.models import Deployment

    ids = {i for i in ids if i}
    if not ids:
        return {}
    return dict(Deployment.objects.filter(pk__in=ids).values_list("pk", "name"))


def _profile_names(ids) -> dict[int, str]:
    from catalog.models import HardwareProfile

    return dict(HardwareProfile.objects.filter(pk__in=set(ids)).values_list("pk", "name"))


@dataclass
class _Names:
    versions: dict
    deployments: dict
    profiles: dict
    embedding_versions: set = field(default_factory=set)

    @classmethod
    def load(cls, tokens: list[dict], dedicated: list[dict]) -> "_Names":
        versions, embedding_versions = _versions(
            [g["model_version_id"] for g in tokens] + [g["model_version_id"] for g in dedicated]
        )
        return cls(
            versions=versions,
            embedding_versions=embedding_versions,
            deployments=_deployment_names(g["deployment_id"] for g in dedicated),
            profiles=_profile_names(g["hardware_profile_id"] for g in dedicated),
        )


def usage_lines(
    *, currency: str, tokens: list[dict], dedicated: list[dict], names: _Names
) -> list[DraftLine]:
    """Invoice lines for one organization's groups, in a stable order. Groups in another
    currency than the invoice's are left out (billing_reconcile reports them)."""
    lines = []
    # One line per (kind, version, unit price): groups that differ only in another price (the
    # output or cached price) add to the same input line.
    counts: dict[tuple, int] = {}
    labels: dict[int | None, str] = {}
    for group in sorted(
        (g for g in tokens if g["currency"] == currency),
        key=lambda g: (
            names.versions.get(g["model_version_id"], ""),
            g["model_version_id"] or 0,
            g["input_price_per_million"],
            g["output_price_per_million"],
            g["cached_price"],
        ),
    ):
        version = group["model_version_id"]
        label = names.versions.get(version) or (f"model version {version}" if version else "")
        labels[version] = label or "unknown model"
        # Cached tokens have their own line when they have their own price.
        cached = group["cached_tokens"] or 0
        if group["cached_price"] == group["input_price_per_million"]:
            cached = 0
        for kind, count, price in (
            (
                InvoiceLine.Kind.EMBEDDING_TOKENS
                if version in names.embedding_versions
                else InvoiceLine.Kind.INPUT_TOKENS,
                group["input_tokens"] - cached,
                group["input_price_per_million"],
            ),
            (InvoiceLine.Kind.CACHED_INPUT_TOKENS, cached, group["cached_price"]),
            (
                InvoiceLine.Kind.OUTPUT_TOKENS,
                group["output_tokens"],
                group["output_price_per_million"],
            ),
        ):
            if count:
                key = (kind, version, price)
                counts[key] = counts.get(key, 0) + count
    for (kind, version, price), count in counts.items():
        exact = rate_tokens(
            input_tokens=count,
            output_tokens=0,
            input_per_million=price,
            output_per_million=Decimal(0),
        )
        lines.append(
            DraftLine(
                kind=kind,
                description=f"{labels[version]} — {InvoiceLine.Kind(kind).label.lower()}"
                + ("" if price else " (no price in force)"),
                quantity=(Decimal(count) / MILLION).quantize(_QUANTITY),
                unit="1M tokens",
                unit_price=price,
                amount_exact=stored_amount(exact),
                amount=round_money(exact, currency),
                ledger_quantity=count,
                model_version_id=version,
            )
        )
    for group in sorted(
        (g for g in dedicated if g["currency"] == currency),
        key=lambda g: (
            names.deployments.get(g["deployment_id"], ""),
            str(g["deployment_id"]),
            names.versions.get(g["model_version_id"], ""),
            g["model_version_id"] or 0,
            g["hardware_profile_id"],
            g["price_per_hour"],
        ),
    ):
        seconds, gpus, per_hour = group["seconds"], group["gpu_count"], group["price_per_hour"]
        exact = rate_gpu_seconds(seconds=seconds, per_hour=per_hour)
        deployment = names.deployments.get(group["deployment_id"]) or str(group["deployment_id"])
        profile = names.profiles.get(group["hardware_profile_id"], "")
        version = names.versions.get(group["model_version_id"]) or (
            f"model version {group['model_version_id']}"
        )
        if gpus:
            quantity = Decimal(seconds * gpus) / SECONDS_PER_HOUR
            unit, unit_price = "GPU hour", per_hour / gpus
        else:
            quantity = Decimal(seconds) / SECONDS_PER_HOUR
            unit, unit_price = "replica hour", per_hour
        lines.append(
            DraftLine(
                kind=InvoiceLine.Kind.DEDICATED,
                description=f"Dedicated deployment {deployment} ({version} on {profile})",
                quantity=quantity.quantize(_QUANTITY),
                unit=unit,
                unit_price=unit_price.quantize(Decimal("0.00000001")),
                amount_exact=stored_amount(exact),
                amount=round_money(exact, currency),
                ledger_quantity=seconds,
                model_version_id=group["model_version_id"],
                deployment_id=group["deployment_id"],
                hardware_profile_id=group["hardware_profile_id"],
            )
        )
    return lines


@dataclass(frozen=True)
class Commitment:
    """What an approved private offer commits its customer to spend on its model in one
    billing period: the monthly amount, prorated by the share of the period the offer covers
    (an offer that starts, expires or is withdrawn within the period commits that share)."""

    offer: object  # catalog.models.PrivateOffer
    amount: Decimal


def commitments_for(*, period: Period, organization_ids=None) -> dict[int, list[Commitment]]:
    """The commitments of approved private offers in force during `period`, per organization
    (one query)."""
    from catalog.models import PrivateOffer

    offers = (
        PrivateOffer.objects.filter(
            status=PrivateOffer.Status.APPROVED,
            committed_monthly_spend__gt=0,
            starts_at__lt=period.end,
        )
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=period.start))
        .select_related("model_version__model")
        .order_by("model_version_id", "starts_at")
    )
    if organization_ids is not None:
        offers = offers.filter(organization_id__in=list(organization_ids))
    whole = (period.end - period.start) // timedelta(microseconds=1)
    result = defaultdict(list)
    for offer in offers:
        covered = min(period.end, offer.expires_at or period.end) - max(
            period.start, offer.starts_at
        )
        share = Decimal(covered // timedelta(microseconds=1)) / Decimal(whole)
        amount = round_money(offer.committed_monthly_spend * share, offer.currency)
        if amount > 0:
            result[offer.organization_id].append(Commitment(offer, amount))
    return result


def commitment_lines(
    *, currency: str, lines: list[DraftLine], offers: list[Commitment]
) -> list[DraftLine]:
    """A line per commitment whose model's usage lines this period add up to less than it: the
    difference, so the model's lines total the commitment."""
    extra = []
    for commitment in offers:
        offer = commitment.offer
        if offer.currency != currency:
            continue
        spent = sum(
            (line.amount for line in lines if line.model_version_id == offer.model_version_id),
            Decimal(0),
        )
        shortfall = round_money(commitment.amount - spent, currency)
        if shortfall <= 0:
            continue
        monthly = format_money(offer.committed_monthly_spend, currency)
        prorated = (
            ""
            if commitment.amount == offer.committed_monthly_spend
            else f" (prorated: {format_money(commitment.amount, currency)} {currency} this period)"
        )
        extra.append(
            DraftLine(
                kind=InvoiceLine.Kind.COMMITMENT,
                description=f"{offer.model_version} — committed spend {monthly} {currency} "
                f"a period{prorated}, shortfall",
                quantity=Decimal(1),
                unit="",
                unit_price=shortfall,
                amount_exact=shortfall,
                amount=shortfall,
                model_version_id=offer.model_version_id,
            )
        )
    return extra


def _draft(
    *,
    organization: Organization,
    period: Period,
    tokens: list[dict],
    dedicated: list[dict],
    names: _Names,
    grants: list[CreditGrant],
    commitments: list | None = None,
) -> DraftInvoice:
    """What the invoice says, given the usage groups, the committed offers and the credit
    grants it may draw on (in the order it draws)."""
    currency = organization.currency
    lines = usage_lines(currency=currency, tokens=tokens, dedicated=dedicated, names=names)
    if commitments is None:
        commitments = commitments_for(period=period, organization_ids=[organization.pk])
        commitments = commitments.get(organization.pk, [])
    lines += commitment_lines(currency=currency, lines=lines, offers=commitments)
    rate = tax_rate()
    totals = invoice_totals(
        line_amounts=[line.amount for line in lines],
        currency=currency,
        tax_rate=rate,
        credits_available=sum((g.remaining for g in grants), Decimal(0)),
    )
    draws, left = [], totals.credits_applied
    for grant in grants:
        if left <= 0:
            break
        take = min(grant.remaining, left)
        draws.append((grant, take))
        left -= take
    return DraftInvoice(
        organization=organization,
        period=period,
        currency=currency,
        tax_rate=rate,
        lines=lines,
        subtotal=totals.subtotal,
        tax=totals.tax,
        credits_applied=totals.credits_applied,
        total=totals.total,
        credit_draws=draws,
    )


def invoice_draft(*, organization: Organization, now: datetime | None = None) -> DraftInvoice:
    """The live draft of the current period: what the invoice would say if it closed now."""
    period = period_containing(now or timezone.now())
    tokens = token_groups(period_start=period.start, organization_id=organization.pk)
    dedicated = dedicated_groups(period_start=period.start, organization_id=organization.pk)
    return _draft(
        organization=organization,
        period=period,
        tokens=tokens,
        dedicated=dedicated,
        names=_Names.load(tokens, dedicated),
        grants=list(
            credit_grants_available(
                organization=organization, currency=organization.currency, at=period.end
            )
        ),
    )


# --- Closing -----------------------------------------------------------------------------------


@dataclass
class CloseResult:
    period: Period
    created: list[Invoice]
    skipped: int


def billing_period_close(
    *, period_start: datetime, now: datetime | None = None, chunk_size: int = 100
) -> CloseResult:
    """Close a finished period: finalize an invoice for every organization with usage in it,
    `chunk_size` organizations per transaction. Idempotent; see the module docstring for why
    a crash or a rerun is harmless."""
    now = now or timezone.now()
    period = period_starting(period_start)
    if period.end > now:
        raise ValidationFailed(
            f"The period {period.label} has not ended yet; it can close after "
            f"{period.end.isoformat()}."
        )
    billing_period_mark_closing(period=period, now=now)
    tokens = token_groups(period_start=period.start)
    dedicated = dedicated_groups(period_start=period.start)
    names = _Names.load(tokens, dedicated)
    by_org_tokens, by_org_dedicated = defaultdict(list), defaultdict(list)
    for group in tokens:
        by_org_tokens[group["organization_id"]].append(group)
    for group in dedicated:
        by_org_dedicated[group["organization_id"]].append(group)
    done = set(
        Invoice.objects.filter(period_start=period.start).values_list("organization_id", flat=True)
    )
    # An organization with a committed spend is invoiced even without usage.
    committed = commitments_for(period=period).keys()
    pending = list(
        Organization.objects.filter(
            pk__in=(by_org_tokens.keys() | by_org_dedicated.keys() | committed) - done
        ).order_by("pk")
    )
    created = []
    for first in range(0, len(pending), chunk_size):
        created += invoices_finalize(
            organizations=pending[first : first + chunk_size],
            period=period,
            tokens=by_org_tokens,
            dedicated=by_org_dedicated,
            names=names,
            now=now,
        )
    # The publishers' statements read the invoices just written (billing.statements).
    statements_finalize(period=period, now=now)
    BillingPeriod.objects.filter(start=period.start).update(status="closed", closed_at=now)
    return CloseResult(
        period=period, created=created, skipped=len(done) + len(pending) - len(created)
    )


@transaction.atomic
def billing_period_mark_closing(*, period: Period, now: datetime) -> BillingPeriod:
    """Stop usage from entering `period`: after this commits, ingestion sends late usage to
    the period open then. Waits for ingestion transactions that hold the period."""
    BillingPeriod.objects.bulk_create(
        [BillingPeriod(start=period.start, end=period.end)], ignore_conflicts=True
    )
    row = BillingPeriod.objects.select_for_update().get(start=period.start)
    if row.status == BillingPeriod.Status.OPEN:
        row.status = BillingPeriod.Status.CLOSING
        row.closing_started_at = now
        row.save(update_fields=["status", "closing_started_at"])
    return row


def billing_periods_close_due(*, now: datetime | None = None) -> list[CloseResult]:
    """Close every period that has ended and is not closed (the beat task's job)."""
    now = now or timezone.now()
    current = period_containing(now)
    results = []
    due = BillingPeriod.objects.filter(end__lte=now).exclude(status=BillingPeriod.Status.CLOSED)
    for start in due.order_by("start").values_list("start", flat=True):
        if start < current.start:
            results.append(billing_period_close(period_start=start, now=now))
    return results


def next_document_number(kind: str, year: int) -> str:
    name = f"{kind}-{year}"
    NumberSequence.objects.bulk_create([NumberSequence(name=name)], ignore_conflicts=True)
    sequence = NumberSequence.objects.select_for_update().get(name=name)
    sequence.last_value += 1
    sequence.save(update_fields=["last_value"])
    return _format_number(kind, year, sequence.last_value)


def _format_number(kind: str, year: int, value: int) -> str:
    middle = "" if kind == "invoice" else "CN-"
    return f"{settings.BILLING_INVOICE_PREFIX}-{middle}{year}-{value:06d}"


@transaction.atomic
def invoices_finalize(
    *,
    organizations: list[Organization],
    period: Period,
    tokens: dict[int, list[dict]],
    dedicated: dict[int, list[dict]],
    names: _Names,
    now: datetime,
) -> list[Invoice]:
    """Write the finalized invoices of these organizations for `period`, numbered in
    sequence, drawing their prepaid credits; organizations that have one already are skipped.

    The number counter is taken FOR UPDATE first, so concurrent closers take turns here, and
    the check for existing invoices after it sees everything they committed.
    """
    year = now.year
    name = f"invoice-{year}"
    NumberSequence.objects.bulk_create([NumberSequence(name=name)], ignore_conflicts=True)
    sequence = NumberSequence.objects.select_for_update().get(name=name)
    have = set(
        Invoice.objects.filter(
            period_start=period.start, organization__in=organizations
        ).values_list("organization_id", flat=True)
    )
    organizations = [o for o in organizations if o.pk not in have]
    if not organizations:
        return []
    grants = defaultdict(list)
    for grant in (
        CreditGrant.objects.select_for_update()
        .filter(organization__in=organizations, remaining__gt=0)
        .exclude(expires_at__lte=period.end)
        .order_by(F("expires_at").asc(nulls_last=True), "created_at", "id")
    ):
        grants[grant.organization_id].append(grant)
    stripe_on = bool(settings.STRIPE_API_KEY)
    commitments = commitments_for(period=period, organization_ids=[o.pk for o in organizations])
    drafts, invoices = [], []
    for organization in organizations:
        draft = _draft(
            organization=organization,
            period=period,
            tokens=tokens.get(organization.pk, []),
            dedicated=dedicated.get(organization.pk, []),
            names=names,
            grants=[g for g in grants[organization.pk] if g.currency == organization.currency],
            commitments=commitments.get(organization.pk, []),
        )
        sequence.last_value += 1
        drafts.append(draft)
        invoices.append(
            Invoice(
                organization=organization,
                number=_format_number("invoice", year, sequence.last_value),
                period_start=period.start,
                period_end=period.end,
                currency=draft.currency,
                subtotal=draft.subtotal,
                tax_rate=draft.tax_rate,
                tax=draft.tax,
                credits_applied=draft.credits_applied,
                total=draft.total,
                finalized_at=now,
                payment_status=(
                    Invoice.PaymentStatus.UNPAID
                    if draft.total > 0
                    else Invoice.PaymentStatus.NOTHING_DUE
                ),
                stripe_status=(
                    Invoice.StripeStatus.PENDING
                    if stripe_on and draft.total > 0
                    else Invoice.StripeStatus.DISABLED
                ),
            )
        )
    invoices = Invoice.objects.bulk_create(invoices)
    if any(invoice.pk is None for invoice in invoices):  # a database without RETURNING
        by_number = dict(
            Invoice.objects.filter(number__in=[i.number for i in invoices]).values_list(
                "number", "pk"
            )
        )
        for invoice in invoices:
            invoice.pk = by_number[invoice.number]
    sequence.save(update_fields=["last_value"])
    lines, applications, drawn = [], [], []
    for invoice, draft in zip(invoices, drafts, strict=True):
        lines += [
            InvoiceLine(
                invoice=invoice,
                position=position,
                kind=line.kind,
                description=line.description[:300],
                model_version_id=line.model_version_id,
                deployment_id=line.deployment_id,
                hardware_profile_id=line.hardware_profile_id,
                quantity=line.quantity,
                unit=line.unit,
                unit_price=line.unit_price,
                amount_exact=line.amount_exact,
                amount=line.amount,
                ledger_quantity=line.ledger_quantity,
            )
            for position, line in enumerate(draft.all_lines, start=1)
        ]
        for grant, amount in draft.credit_draws:
            grant.remaining -= amount
            drawn.append(grant)
            applications.append(CreditApplication(grant=grant, invoice=invoice, amount=amount))
    InvoiceLine.objects.bulk_create(lines, batch_size=2000)
    CreditGrant.objects.bulk_update(drawn, ["remaining"])
    CreditApplication.objects.bulk_create(applications)
    # The platform finalizes invoices on its own; each organization's log still says so.
    AuditLogEntry.objects.bulk_create(
        [
            audit_entry(
                actor=Actor.system(invoice.organization),
                action="invoice.finalize",
                target=invoice,
                changes={
                    "total": format_money(invoice.total, invoice.currency),
                    "currency": invoice.currency,
                    "credits_applied": format_money(invoice.credits_applied, invoice.currency),
                },
            )
            for invoice in invoices
        ],
        batch_size=2000,
    )
    to_sync = [i.pk for i in invoices if i.stripe_status == Invoice.StripeStatus.PENDING]
    if to_sync:
        from billing.tasks import invoice_stripe_sync

        transaction.on_commit(lambda: [invoice_stripe_sync.delay(pk) for pk in to_sync])
    return invoices
