from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.money import format_money
from billing.periods import periods_in_month
from billing.reconcile import reconcile_period


class Command(BaseCommand):
    help = (
        "Compare a month's ledger, invoices and Stripe amounts; print every difference and "
        "exit non-zero if there is any."
    )

    def add_arguments(self, parser):
        parser.add_argument("--period", required=True, help="The month, YYYY-MM.")
        parser.add_argument(
            "--no-stripe", action="store_true", help="Do not ask Stripe (offline checks only)."
        )

    def handle(self, *args, period, no_stripe, **options):
        try:
            periods = periods_in_month(period)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        now = timezone.now()
        differences = 0
        for billing_period in periods:
            if billing_period.end > now:
                raise CommandError(
                    f"The period {billing_period.label} has not ended; reconcile closed periods."
                )
            report = reconcile_period(billing_period, check_stripe=not no_stripe)
            self.stdout.write(f"period {billing_period.label}")
            self.stdout.write(
                f"  {'organization':<24} {'currency':<8} {'ledger':>14} {'invoice':<20} "
                f"{'subtotal':>14} {'total':>14} {'stripe due':>12}"
            )
            for row in report.organizations:
                subtotal, total = (
                    ("-", "-")
                    if row.invoice_subtotal is None
                    else (
                        format_money(row.invoice_subtotal, row.currency),
                        format_money(row.invoice_total, row.currency),
                    )
                )
                self.stdout.write(
                    f"  {row.organization:<24} {row.currency:<8} {row.ledger_subtotal!s:>14} "
                    f"{row.invoice_number or '-':<20} {subtotal:>14} {total:>14} "
                    f"{'-' if row.stripe_amount_due is None else row.stripe_amount_due!s:>12}"
                )
            for note in report.notes:
                self.stdout.write(f"  note: {note}")
            for difference in report.differences:
                self.stdout.write(f"  DIFFERENCE {difference}")
            differences += len(report.differences)
        if differences:
            raise CommandError(f"{differences} difference(s) found", returncode=1)
        self.stdout.write(
            self.style.SUCCESS("ledger, invoices, publisher statements and Stripe agree")
        )
