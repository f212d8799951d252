from django.core.management.base import BaseCommand, CommandError

from catalog.credentials import InvalidToken
from catalog.providers import provider_credentials_rotate


class Command(BaseCommand):
    help = (
        "Re-encrypt every provider credential with the first key of PROVIDER_CREDENTIAL_KEYS. "
        "Run after putting a new key first; drop the old key only once this succeeded."
    )

    def handle(self, *args, **options):
        try:
            rotated = provider_credentials_rotate()
        except InvalidToken:
            raise CommandError(
                "A stored credential cannot be decrypted with any key of "
                "PROVIDER_CREDENTIAL_KEYS: put back the key it was encrypted with (nothing "
                "was changed)."
            ) from None
        self.stdout.write(f"Re-encrypted {rotated} provider credential(s) with the first key.")
