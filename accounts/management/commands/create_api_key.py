from django.core.management.base import BaseCommand, CommandError

from accounts.actors import Actor
from accounts.models import Organization
from accounts.roles import Role
from accounts.services import api_key_create
from controlplane.errors import DomainError


class Command(BaseCommand):
    help = "Create an API key for an organization. Prints the secret alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="Organization slug.")
        parser.add_argument("--name", required=True, help="A name to tell the key apart.")
        parser.add_argument("--rpm", type=int, default=None, help="Requests per minute limit.")
        parser.add_argument("--tpm", type=int, default=None, help="Tokens per minute limit.")
        parser.add_argument(
            "--scopes",
            default="inference,management",
            help="Comma-separated: inference (the /v1 gateway), management (the REST API).",
        )
        parser.add_argument("--role", default=Role.ADMIN, choices=Role.values)

    def handle(self, *args, org, name, rpm, tpm, scopes, role, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization with slug {org!r}.")
        for value, flag in ((rpm, "--rpm"), (tpm, "--tpm")):
            if value is not None and value < 1:
                raise CommandError(f"{flag} must be a positive number.")
        try:
            key, secret = api_key_create(
                actor=Actor.system(organization),
                name=name,
                scopes=[s.strip() for s in scopes.split(",") if s.strip()],
                role=role,
                rpm_limit=rpm,
                tpm_limit=tpm,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"Created API key {key.name!r} ({key.display_prefix}…) for {org}.")
        self.stdout.write(secret)
