"""Publisher statements: what each publisher earned in a closed period, from the same ledger as
the invoices — in fact from the finalized invoices' own lines, so a statement's revenue is what
customers were invoiced for the publisher's models, to the cent.

- A usage line per model version: its invoice lines in the period summed (tokens, GPU time,
  revenue = the lines' rounded amounts, customers = organizations invoiced), times the
  listing's revenue share in force at the period's start, rounded half-up once.
- An adjustment line per credit note issued in the period (for an invoice of any period) and
  model version on that invoice: the note's amount split over the invoice's charge (subtotal
  plus tax) pro rata of the version's lines, rounded, negative; times the share of the
  credited invoice's period, rounded.
- total = share + adjustments: what is paid out (billing.payouts). Nothing is due below zero;
  a negative total is carried as it is (the operator settles it), never netted silently.

Statements are written at period close, after the invoices (billing_period_close calls
`statements_finalize`), one per publisher and currency, numbered PREFIX-PS-YEAR-NNNNNN in one
gapless sequence; a rerun skips those written. They never change afterwards but for their
payout's progress. `billing_reconcile` recomputes each one from the invoices and reports
any difference (`statement_differences`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import AuditLogEntry
from accounts.services import audit_entry, audit_record
from billing.models import (
    BillingPeriod,
    CreditNote,
    InvoiceLine,
    NumberSequence,
    PublisherStatement,
    RevenueShare,
    StatementLine,
)
from billing.money import format_money, round_money
from billing.periods import Period, period_containing
from catalog.models import Listing, ModelVersion, Publisher
from catalog.permissions import require_operator
from controlplane.errors import Conflict, ValidationFailed

HUNDRED = Decimal(100)
ZERO = Decimal(0)


# --- revenue shares ----------------------------------------------------------------------------


@transaction.atomic
def revenue_share_set(
    *, actor: Actor, listing: Listing, percent: Decimal, effective_from: datetime
) -> RevenueShare:
    """The publisher's share of the listing's revenue from the billing period starting at
    `effective_from` on (operators). It must start a period that is still open, so no
    statement written already would read differently; shares are never edited."""
    require_operator(actor)
    if not isinstance(percent, Decimal) or not ZERO <= percent <= HUNDRED:
        raise ValidationFailed("percent is a Decimal from 0 to 100.", field="percent")
    if percent != percent.quantize(Decimal("0.01")):
        raise ValidationFailed("percent has at most two decimal places.", field="percent")
    if timezone.is_naive(effective_from):
        raise ValidationFailed("Give effective_from with a time zone.", field="effective_from")
    period = period_containing(effective_from)
    if period.start != effective_from:
        raise ValidationFailed(
            f"A share starts with a billing period: {period.start.isoformat()} (or the next "
            "period's start), not in the middle of one.",
            field="effective_from",
        )
    if (
        BillingPeriod.objects.filter(start=period.start)
        .exclude(status=BillingPeriod.Status.OPEN)
        .exists()
    ):
        raise Conflict(
            f"The period {period.label} is closed or closing: its statements are written. "
            "Start the share with a later period.",
            field="effective_from",
        )
    try:
        with transaction.atomic():
            share = RevenueShare.objects.create(
                listing=listing,
                percent=percent,
                effective_from=effective_from,
                created_by_label=actor.label[:200],
            )
    except IntegrityError:
        raise Conflict("A share starting then exists already.", field="effective_from") from None
    audit_record(
        actor=actor,
        action="publisher.revenue_share.set",
        target=listing,
        organization=listing.publisher.organization,
        changes={"percent": str(percent), "effective_from": effective_from.isoformat()},
    )
    return share


def revenue_share_list(*, listing: Listing) -> QuerySet[RevenueShare]:
    return RevenueShare.objects.filter(listing=listing).order_by("-effective_from")


def _share_percents(listing_ids, starts) -> dict[tuple[int, datetime], Decimal]:
    """The share in force at each period start, per listing (0 where none is)."""
    shares = defaultdict(list)
    for share in RevenueShare.objects.filter(listing_id__in=set(listing_ids)).order_by(
        "effective_from"
    ):
        shares[share.listing_id].append(share)
    result = {}
    for listing_id in set(listing_ids):
        for start in set(starts):
            percent = ZERO
            for share in shares[listing_id]:
                if share.effective_from <= start:
                    percent = share.percent
            result[(listing_id, start)] = percent
    return result


# --- what a statement says ----------------------------------------------------------------------


@dataclass
class DraftStatementLine:
    kind: str
    description: str
    model_version_id: int
    share_percent: Decimal
    revenue: Decimal
    share: Decimal
    input_tokens: int = 0
    output_tokens: int = 0
    gpu_seconds: int = 0
    customers: int = 0
    credit_note_id: int | None = None


@dataclass
class DraftStatement:
    publisher: Publisher
    period: Period
    currency: str
    lines: list[DraftStatementLine] = field(default_factory=list)

    @property
    def revenue(self) -> Decimal:
        return sum((x.revenue for x in self.lines if x.kind == "usage"), ZERO)

    @property
    def share(self) -> Decimal:
        return sum((x.share for x in self.lines if x.kind == "usage"), ZERO)

    @property
    def adjustments(self) -> Decimal:
        return sum((x.share for x in self.lines if x.kind == "adjustment"), ZERO)

    @property
    def total(self) -> Decimal:
        return self.share + self.adjustments


def _publisher_versions() -> dict[int, tuple[Publisher, int, str]]:
    """Every listed model version: (its publisher, its listing id, its name)."""
    versions = {}
    for version in ModelVersion.objects.filter(model__listing__isnull=False).select_related(
        "model__listing__publisher__organization"
    ):
        listing = version.model.listing
        versions[version.pk] = (listing.publisher, listing.pk, str(version))
    return versions


def _gpu_seconds(line: InvoiceLine) -> int:
    if line.kind != InvoiceLine.Kind.DEDICATED or line.unit != "GPU hour":
        return 0
    # quantity is GPU-hours to 6 places: x 3600 is within 0.004 s of the whole seconds.
    return int((line.quantity * 3600).to_integral_value())


def statement_drafts(*, period: Period) -> list[DraftStatement]:
    """What every publisher's statement for `period` says, from the period's finalized
    invoices and the credit notes issued in it (one pass over each)."""
    versions = _publisher_versions()
    if not versions:
        return []
    drafts: dict[tuple[int, str], DraftStatement] = {}

    def draft_for(publisher, currency) -> DraftStatement:
        key = (publisher.pk, currency)
        if key not in drafts:
            drafts[key] = DraftStatement(publisher=publisher, period=period, currency=currency)
        return drafts[key]

    usage = defaultdict(lambda: {"revenue": ZERO, "in": 0, "out": 0, "gpu": 0, "orgs": set()})
    for line in InvoiceLine.objects.filter(
        invoice__period_start=period.start,
        kind__in=InvoiceLine.USAGE_KINDS,
        model_version_id__in=list(versions),
    ).select_related("invoice"):
        sums = usage[(line.model_version_id, line.invoice.currency)]
        sums["revenue"] += line.amount
        if line.kind in (InvoiceLine.Kind.INPUT_TOKENS, InvoiceLine.Kind.EMBEDDING_TOKENS):
            sums["in"] += line.ledger_quantity
        elif line.kind == InvoiceLine.Kind.OUTPUT_TOKENS:
            sums["out"] += line.ledger_quantity
        sums["gpu"] += _gpu_seconds(line)
        sums["orgs"].add(line.invoice.organization_id)

    notes = list(
        CreditNote.objects.filter(created_at__gte=period.start, created_at__lt=period.end)
        .select_related("invoice")
        .order_by("created_at", "id")
    )
    note_lines = defaultdict(lambda: defaultdict(lambda: ZERO))
    for line in InvoiceLine.objects.filter(
        invoice_id__in={n.invoice_id for n in notes},
        kind__in=InvoiceLine.USAGE_KINDS,
        model_version_id__in=list(versions),
    ):
        note_lines[line.invoice_id][line.model_version_id] += line.amount

    listing_ids = {listing_id for _, listing_id, _ in versions.values()}
    starts = {period.start, *(n.invoice.period_start for n in notes)}
    percents = _share_percents(listing_ids, starts)

    for (version_id, currency), sums in sorted(usage.items(), key=lambda i: versions[i[0][0]][2]):
        publisher, listing_id, name = versions[version_id]
        percent = percents[(listing_id, period.start)]
        draft_for(publisher, currency).lines.append(
            DraftStatementLine(
                kind=StatementLine.Kind.USAGE,
                description=f"{name} — usage {period.label}",
                model_version_id=version_id,
                share_percent=percent,
                revenue=sums["revenue"],
                share=round_money(sums["revenue"] * percent / HUNDRED, currency),
                input_tokens=sums["in"],
                output_tokens=sums["out"],
                gpu_seconds=sums["gpu"],
                customers=len(sums["orgs"]),
            )
        )
    for note in notes:
        invoice = note.invoice
        charged = invoice.subtotal + invoice.tax
        if charged <= 0:
            continue
        for version_id, amount in sorted(note_lines[invoice.pk].items()):
            publisher, listing_id, name = versions[version_id]
            credited = round_money(note.amount * amount / charged, invoice.currency)
            if not credited:
                continue
            percent = percents[(listing_id, invoice.period_start)]
            draft_for(publisher, invoice.currency).lines.append(
                DraftStatementLine(
                    kind=StatementLine.Kind.ADJUSTMENT,
                    description=f"{name} — credit note {note.number} on {invoice.number}",
                    model_version_id=version_id,
                    credit_note_id=note.pk,
                    share_percent=percent,
                    revenue=-credited,
                    share=-round_money(credited * percent / HUNDRED, invoice.currency),
                )
            )
    return sorted(drafts.values(), key=lambda d: (d.publisher.organization.slug, d.currency))


# --- writing them --------------------------------------------------------------------------------


def _statement_number(year: int, value: int) -> str:
    return f"{settings.BILLING_INVOICE_PREFIX}-PS-{year}-{value:06d}"


@transaction.atomic
def statements_finalize(*, period: Period, now: datetime | None = None) -> list[PublisherStatement]:
    """Write the period's statements (its invoices are all final by now); those written
    already are skipped, so a rerun after a crash writes each once. Statements with money
    to pay have their payout queued after the commit (billing.payouts)."""
    now = now or timezone.now()
    name = f"statement-{now.year}"
    NumberSequence.objects.bulk_create([NumberSequence(name=name)], ignore_conflicts=True)
    sequence = NumberSequence.objects.select_for_update().get(name=name)
    have = set(
        PublisherStatement.objects.filter(period_start=period.start).values_list(
            "publisher_id", "currency"
        )
    )
    written = []
    for draft in statement_drafts(period=period):
        if (draft.publisher.pk, draft.currency) in have or not draft.lines:
            continue
        sequence.last_value += 1
        statement = PublisherStatement.objects.create(
            publisher=draft.publisher,
            number=_statement_number(now.year, sequence.last_value),
            period_start=period.start,
            period_end=period.end,
            currency=draft.currency,
            revenue=draft.revenue,
            share=draft.share,
            adjustments=draft.adjustments,
            total=draft.total,
            finalized_at=now,
            payout_status=(
                PublisherStatement.PayoutStatus.PENDING
                if draft.total > 0
                else PublisherStatement.PayoutStatus.NOT_DUE
            ),
        )
        StatementLine.objects.bulk_create(
            [
                StatementLine(
                    statement=statement,
                    position=position,
                    kind=line.kind,
                    description=line.description[:300],
                    model_version_id=line.model_version_id,
                    credit_note_id=line.credit_note_id,
                    input_tokens=line.input_tokens,
                    output_tokens=line.output_tokens,
                    gpu_seconds=line.gpu_seconds,
                    customers=line.customers,
                    revenue=line.revenue,
                    share_percent=line.share_percent,
                    share=line.share,
                )
                for position, line in enumerate(draft.lines, start=1)
            ]
        )
        written.append(statement)
    sequence.save(update_fields=["last_value"])
    AuditLogEntry.objects.bulk_create(
        [
            audit_entry(
                actor=Actor.system(s.publisher.organization),
                action="publisher.statement.finalize",
                target=s,
                changes={"total": format_money(s.total, s.currency), "currency": s.currency},
            )
            for s in written
        ]
    )
    due = [s.pk for s in written if s.payout_status == PublisherStatement.PayoutStatus.PENDING]
    if due:
        from billing.tasks import statement_payout

        transaction.on_commit(lambda: [statement_payout.delay(pk) for pk in due])
    return written


def statement_list(*, publisher: Publisher) -> QuerySet[PublisherStatement]:
    return PublisherStatement.objects.filter(publisher=publisher).order_by(
        "-period_start", "currency"
    )


# --- reconciliation ---------------------------------------------------------------------------


def statement_differences(*, period: Period) -> list[str]:
    """Every difference between the period's stored statements and what the invoices and
    credit notes say now; empty when they agree to the cent."""
    differences = []
    stored = {
        (s.publisher_id, s.currency): s
        for s in PublisherStatement.objects.filter(period_start=period.start).prefetch_related(
            "lines"
        )
    }
    wanted = {(d.publisher.pk, d.currency): d for d in statement_drafts(period=period)}
    for key in sorted(stored.keys() | wanted.keys()):
        statement, draft = stored.get(key), wanted.get(key)
        if statement is None:
            if draft.lines:
                differences.append(
                    f"publisher {draft.publisher} {period.label} {draft.currency}: invoices "
                    f"give a statement (share {draft.total}) but there is none"
                )
            continue
        where = f"statement {statement.number}"
        lines = list(statement.lines.all())
        if draft is None:
            differences.append(f"{where}: no invoice line of the publisher's models backs it")
            continue
        have = [
            (x.kind, x.model_version_id, x.credit_note_id, x.revenue, x.share, x.input_tokens,
             x.output_tokens, x.gpu_seconds)
            for x in lines
        ]  # fmt: skip
        want = [
            (x.kind, x.model_version_id, x.credit_note_id, x.revenue, x.share, x.input_tokens,
             x.output_tokens, x.gpu_seconds)
            for x in draft.lines
        ]  # fmt: skip
        if have != want:
            differences.append(f"{where}: its lines differ from the invoices' (have {have}, "
                               f"invoices give {want})")  # fmt: skip
        usage = [x for x in lines if x.kind == StatementLine.Kind.USAGE]
        adjustments = [x for x in lines if x.kind == StatementLine.Kind.ADJUSTMENT]
        if (
            statement.revenue != sum((x.revenue for x in usage), ZERO)
            or statement.share != sum((x.share for x in usage), ZERO)
            or statement.adjustments != sum((x.share for x in adjustments), ZERO)
            or statement.total != statement.share + statement.adjustments
        ):
            differences.append(f"{where}: its totals do not add up from its lines")
    return differences
