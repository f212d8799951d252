from decimal import Decimal, InvalidOperation

from django.core.management.base import BaseCommand, CommandError

from billing.management.operators import operator_actor
from billing.models import Invoice
from billing.services import credit_note_create
from controlplane.errors import DomainError


class Command(BaseCommand):
    help = "Correct a finalized invoice with a credit note (the invoice itself never changes)."

    def add_arguments(self, parser):
        parser.add_argument("--invoice", required=True, help="Invoice number, e.g. SIR-2026-000001")
        parser.add_argument("--amount", required=True, help="In the invoice's currency, e.g. 12.50")
        parser.add_argument("--reason", required=True)
        parser.add_argument(
            "--by", help="Your login email, for the audit log (default: the system)."
        )

    def handle(self, *args, invoice, amount, reason, by, **options):
        found = Invoice.objects.select_related("organization").filter(number=invoice).first()
        if found is None:
            raise CommandError(f"No invoice numbered {invoice!r}.")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise CommandError(f"{amount!r} is not an amount; write it like 12.50.") from None
        try:
            note = credit_note_create(
                actor=operator_actor(found.organization, by),
                invoice=found,
                amount=value,
                reason=reason,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(
            f"{note.number}: {note.amount} {found.currency} credited on {found.number}"
        )
