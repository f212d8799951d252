from datetime import datetime
from decimal import Decimal, InvalidOperation

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization
from billing.management.operators import operator_actor
from billing.services import credit_grant_create
from controlplane.errors import DomainError


class Command(BaseCommand):
    help = "Give an organization prepaid credit (in its currency); invoices draw on it at close."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="Organization slug")
        parser.add_argument("--amount", required=True, help="e.g. 100.00")
        parser.add_argument("--description", default="prepaid credit")
        parser.add_argument(
            "--expires", help="ISO date-time the credit expires, e.g. 2027-01-01T00:00Z"
        )
        parser.add_argument(
            "--by", help="Your login email, for the audit log (default: the system)."
        )

    def handle(self, *args, org, amount, description, expires, by, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization {org!r}.")
        try:
            value = Decimal(amount)
            expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None
        except (InvalidOperation, ValueError) as exc:
            raise CommandError(f"Bad --amount or --expires: {exc}") from None
        if expires_at is not None and expires_at.tzinfo is None:
            raise CommandError("Give --expires a time zone, e.g. 2027-01-01T00:00Z.")
        actor = operator_actor(organization, by)
        try:
            grant = credit_grant_create(
                actor=actor,
                organization=organization,
                amount=value,
                description=description,
                expires_at=expires_at,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"granted {grant.amount} {grant.currency} to {organization.slug}")
