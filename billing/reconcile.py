"""Reconciliation of a closed period: the ledger (recomputed now) against the invoices, the
rollups against the ledger, the invoices against Stripe, and dedicated GPU time against the
replicas' observed runs. Every difference is reported."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum

from accounts.models import Organization
from billing.invoicing import (
    _Names,
    commitment_lines,
    commitments_for,
    dedicated_groups,
    token_groups,
    usage_lines,
)
from billing.ledger import provider_cost_book
from billing.margins import margin_report
from billing.models import (
    DedicatedUsageRecord,
    Invoice,
    InvoiceLine,
    ReplicaUsageCursor,
    UsageRecord,
    UsageRollup,
)
from billing.money import format_money, to_minor_units
from billing.periods import Period
from billing.rating import rate_tokens, stored_amount
from billing.statements import statement_differences
from billing.stripe_sync import stripe_amount_due, stripe_enabled
from catalog.models import Model, ModelVersion
from deployments.models import ReplicaUsage

ZERO = Decimal(0)


@dataclass
class OrganizationReport:
    organization: str
    currency: str
    ledger_subtotal: Decimal
    invoice_number: str = ""
    invoice_subtotal: Decimal | None = None
    invoice_total: Decimal | None = None
    stripe_amount_due: int | None = None


@dataclass
class PeriodReport:
    period: Period
    organizations: list[OrganizationReport] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _line_key(line) -> tuple:
    return (
        line.kind,
        line.model_version_id or None,
        str(line.deployment_id or ""),
        line.hardware_profile_id or None,
        line.unit_price,
    )


def reconcile_period(period: Period, *, check_stripe: bool = True) -> PeriodReport:
    report = PeriodReport(period=period)
    tokens = token_groups(period_start=period.start)
    dedicated = dedicated_groups(period_start=period.start)
    names = _Names.load(tokens, dedicated)
    by_org = defaultdict(lambda: ([], []))
    for group in tokens:
        by_org[group["organization_id"]][0].append(group)
    for group in dedicated:
        by_org[group["organization_id"]][1].append(group)
    invoices = {
        invoice.organization_id: invoice
        for invoice in Invoice.objects.filter(period_start=period.start).prefetch_related("lines")
    }
    commitments = commitments_for(period=period)
    organizations = Organization.objects.in_bulk(
        by_org.keys() | invoices.keys() | commitments.keys()
    )
    for org_id in sorted(organizations):
        organization = organizations[org_id]
        invoice = invoices.get(org_id)
        currency = invoice.currency if invoice else organization.currency
        org_tokens, org_dedicated = by_org.get(org_id, ([], []))
        expected = usage_lines(
            currency=currency, tokens=org_tokens, dedicated=org_dedicated, names=names
        )
        expected += commitment_lines(
            currency=currency, lines=expected, offers=commitments.get(org_id, [])
        )
        row = OrganizationReport(
            organization=organization.slug,
            currency=currency,
            ledger_subtotal=sum((line.amount for line in expected), Decimal(0)),
        )
        report.organizations.append(row)
        where = f"{organization.slug} {period.label}"
        for group in (*org_tokens, *org_dedicated):
            if group["currency"] != currency:
                report.differences.append(
                    f"{where}: ledger usage in {group['currency']} cannot be on a "
                    f"{currency} invoice ({group})"
                )
        if invoice is None:
            if expected:
                report.differences.append(
                    f"{where}: the ledger has {row.ledger_subtotal} {currency} of usage "
                    "but there is no invoice"
                )
            continue
        where = f"{where} {invoice.number}"
        row.invoice_number = invoice.number
        row.invoice_subtotal, row.invoice_total = invoice.subtotal, invoice.total
        stored = [line for line in invoice.lines.all() if line.kind in InvoiceLine.USAGE_KINDS]
        want = {_line_key(line): line for line in expected}
        have = {_line_key(line): line for line in stored}
        for key in sorted(want.keys() | have.keys(), key=str):
            a, b = want.get(key), have.get(key)
            if b is None:
                report.differences.append(
                    f"{where}: missing line {a.description!r}: ledger {a.ledger_quantity} "
                    f"units = {a.amount} {currency}"
                )
            elif a is None:
                report.differences.append(
                    f"{where}: line {b.position} {b.description!r} "
                    f"({format_money(b.amount, currency)} {currency}) "
                    "has no usage in the ledger"
                )
            elif (a.ledger_quantity, a.amount) != (b.ledger_quantity, b.amount):
                report.differences.append(
                    f"{where}: line {b.position} {b.description!r}: ledger {a.ledger_quantity} "
                    f"units = {format_money(a.amount, currency)} {currency}, invoice "
                    f"{b.ledger_quantity} units = {format_money(b.amount, currency)} {currency}"
                )
        lines_total = sum((line.amount for line in invoice.lines.all()), Decimal(0))
        if invoice.subtotal != sum((line.amount for line in stored), Decimal(0)):
            report.differences.append(f"{where}: subtotal differs from its usage lines")
        if lines_total != invoice.total or (
            invoice.subtotal + invoice.tax - invoice.credits_applied != invoice.total
        ):
            report.differences.append(
                f"{where}: total {invoice.total} does not add up (lines {lines_total})"
            )
        if check_stripe and stripe_enabled() and invoice.total > 0:
            if not invoice.stripe_invoice_id or invoice.stripe_status != "synced":
                report.differences.append(
                    f"{where}: not in Stripe yet ({invoice.stripe_status}; "
                    f"{invoice.stripe_attempts} attempts; {invoice.stripe_last_error[:100]})"
                )
            else:
                row.stripe_amount_due = stripe_amount_due(invoice=invoice)
                ours = to_minor_units(invoice.total, invoice.currency)
                if row.stripe_amount_due != ours:
                    report.differences.append(
                        f"{where}: Stripe asks {row.stripe_amount_due} minor units, "
                        f"the invoice {ours}"
                    )
    _check_rollups(period, report)
    _check_attribution(period, report)
    _check_gpu_time(period, report)
    # The publishers' statements agree with these invoices and the period's credit notes.
    report.differences += statement_differences(period=period)
    _check_partner_margins(period, report, invoices.values())
    unpriced = UsageRecord.objects.filter(
        period_start=period.start, token_price_id__isnull=True
    ).count()
    if unpriced:
        report.notes.append(f"{unpriced} requests had no price in force and were not charged")
    return report


def _check_partner_margins(period: Period, report: PeriodReport, invoices) -> None:
    """Partner models: every ledger row's provider cost is its tokens at the cost in force
    when it finished (recomputed now), and the margin report's revenue is what the invoices
    charge for partner models, per currency."""
    records = UsageRecord.objects.filter(
        period_start=period.start, provider_connection_id__isnull=False
    ).order_by("occurred_at")
    versions = {record.model_version_id for record in records if record.model_version_id}
    book = provider_cost_book(versions)
    missing = 0
    for record in records:
        cost = book.at(record.model_version_id, record.occurred_at)
        expected = ZERO
        if cost is None:
            missing += 1
        else:
            expected = stored_amount(
                rate_tokens(
                    input_tokens=record.input_tokens,
                    output_tokens=record.output_tokens,
                    input_per_million=cost.input_per_million,
                    output_per_million=cost.output_per_million,
                )
            )
        if (record.provider_cost, record.provider_currency) != (
            expected,
            cost.currency if cost else "",
        ):
            report.differences.append(
                f"request {record.request_id}: provider cost {record.provider_cost} "
                f"{record.provider_currency or '-'} on the ledger, {expected} "
                f"{cost.currency if cost else '-'} at the cost in force"
            )
    if missing:
        report.notes.append(f"{missing} partner requests had no provider cost in force")
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    for row in margin_report(period_starts=[period.start]):
        revenue[row.currency] += row.revenue
    partner_versions = set(
        ModelVersion.objects.filter(model__hosting=Model.Hosting.PARTNER).values_list(
            "pk", flat=True
        )
    )
    invoiced: dict[str, Decimal] = defaultdict(Decimal)
    for invoice in invoices:
        for line in invoice.lines.all():
            if line.kind in InvoiceLine.USAGE_KINDS and line.model_version_id in partner_versions:
                invoiced[invoice.currency] += line.amount
    for currency in sorted(revenue.keys() | invoiced.keys()):
        if revenue.get(currency, ZERO) != invoiced.get(currency, ZERO):
            report.differences.append(
                f"partner models {period.label}: the margin report's revenue "
                f"{revenue.get(currency, ZERO)} {currency} differs from the invoices' partner "
                f"lines {invoiced.get(currency, ZERO)} {currency}"
            )


def _check_rollups(period: Period, report: PeriodReport) -> None:
    sums = ("input_tokens", "output_tokens", "cached_tokens")
    ledger = {
        row["organization_id"]: row
        for row in UsageRecord.objects.filter(period_start=period.start)
        .values("organization_id")
        .annotate(requests=Count("pk"), **{s: Sum(s) for s in sums})
        .order_by()
    }
    rollups = {
        row["organization_id"]: row
        for row in UsageRollup.objects.filter(period_start=period.start)
        .values("organization_id")
        .annotate(requests=Sum("requests"), **{s: Sum(s) for s in sums})
        .order_by()
    }
    for org_id in sorted(ledger.keys() | rollups.keys()):
        a, b = ledger.get(org_id), rollups.get(org_id)
        if a != b:
            report.differences.append(
                f"organization {org_id} {period.label}: rollups {b} differ from the ledger {a}"
            )


def _check_attribution(period: Period, report: PeriodReport) -> None:
    """Usage grouped by project, by user and by each tag key the organization used adds up to
    the ledger: every request and every second counted once, in exactly one group."""
    from billing.attribution import ledger_groups
    from metering.models import UsageTag

    token_totals = {
        row["organization_id"]: row
        for row in UsageRecord.objects.filter(period_start=period.start)
        .values("organization_id")
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            amount=Sum("amount"),
        )
        .order_by()
    }
    seconds = dict(
        DedicatedUsageRecord.objects.filter(period_start=period.start)
        .values("organization_id")
        .annotate(seconds=Sum("seconds"))
        .order_by()
        .values_list("organization_id", "seconds")
    )
    for org_id in sorted(token_totals.keys() | seconds.keys()):
        tokens = token_totals.get(org_id, {})
        want = (
            tokens.get("requests", 0),
            tokens.get("input_tokens", 0),
            tokens.get("output_tokens", 0),
            seconds.get(org_id, 0),
        )
        dimensions = [("project", None), ("user", None)] + [
            ("tag", key)
            for key in UsageTag.objects.filter(organization_id=org_id)
            .values_list("key", flat=True)
            .distinct()
            .order_by("key")
        ]
        for dimension, tag_key in dimensions:
            groups = ledger_groups(
                organization_id=org_id,
                dimension=dimension,
                tag_key=tag_key,
                period_start=period.start,
            ).values()
            have = (
                sum(g.requests for g in groups),
                sum(g.input_tokens for g in groups),
                sum(g.output_tokens for g in groups),
                sum(g.gpu_seconds for g in groups),
            )
            token_amount = tokens.get("amount") or Decimal(0)
            if have != want:
                report.differences.append(
                    f"organization {org_id} {period.label}: usage grouped by {dimension}"
                    f"{'=' + tag_key if tag_key else ''} {have} differs from the ledger {want}"
                    " (requests, input tokens, output tokens, GPU seconds)"
                )
            elif (
                not seconds.get(org_id)
                and sum((g.amount for g in groups), Decimal(0)) != token_amount
            ):
                report.differences.append(
                    f"organization {org_id} {period.label}: usage grouped by {dimension} "
                    f"costs {sum((g.amount for g in groups), Decimal(0))}, the ledger "
                    f"{token_amount}"
                )


def _check_gpu_time(period: Period, report: PeriodReport) -> None:
    """Dedicated GPU time is the replicas' observed runs, billed once: the runs of one replica
    (ReplicaUsage rows, one per run of its model server) never overlap, and the ledger's
    segments of every run that ended add up to that run, start rounded down and end up to whole
    seconds (billing/ledger.py's rule)."""
    runs = ReplicaUsage.objects.filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=period.start), started_at__lt=period.end
    ).order_by("deployment_id", "replica_name", "started_at", "id")
    previous = None
    for run in runs:
        if (
            previous is not None
            and (previous.deployment_id, previous.replica_name)
            == (run.deployment_id, run.replica_name)
            and (previous.ended_at is None or previous.ended_at > run.started_at)
        ):
            report.differences.append(
                f"deployment {run.deployment_id} replica {run.replica_name}: run "
                f"{run.pk} from {run.started_at:%Y-%m-%d %H:%M:%S.%f} overlaps run {previous.pk} "
                f"(until {previous.ended_at or 'still running'}): GPU time billed twice"
            )
        previous = run
    ended = {run.pk: run for run in runs if run.ended_at is not None}
    complete = set(
        ReplicaUsageCursor.objects.filter(
            replica_usage_id__in=list(ended), complete=True
        ).values_list("replica_usage_id", flat=True)
    )
    billed = dict(
        DedicatedUsageRecord.objects.filter(replica_usage_id__in=list(complete))
        .values("replica_usage_id")
        .annotate(seconds=Sum("seconds"))
        .order_by()
        .values_list("replica_usage_id", "seconds")
    )
    for pk in sorted(complete):
        run = ended[pk]
        start = run.started_at.replace(microsecond=0)
        end = run.ended_at.replace(microsecond=0)
        if end != run.ended_at:
            end += timedelta(seconds=1)
        observed = int((end - start).total_seconds())
        if billed.get(pk, 0) != observed:
            report.differences.append(
                f"deployment {run.deployment_id} replica {run.replica_name}: run {pk} ran "
                f"{observed} s ({run.started_at:%Y-%m-%d %H:%M:%S} to "
                f"{run.ended_at:%Y-%m-%d %H:%M:%S}), the ledger bills {billed.get(pk, 0)} s"
            )
