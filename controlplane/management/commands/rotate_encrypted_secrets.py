"""Re-encrypt every stored secret (controlplane/secrets_at_rest.py's ENCRYPTED_FIELDS: single
sign-on client secrets, provider credentials) with the first key of PROVIDER_CREDENTIAL_KEYS,
so that the older keys can then be removed. Idempotent; each row is rewritten in its own short
transaction, so it may be stopped and run again. Nothing is changed when a row cannot be read."""

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from controlplane import secrets_at_rest


class Command(BaseCommand):
    help = "Re-encrypt stored secrets with the first key of PROVIDER_CREDENTIAL_KEYS."

    def handle(self, *args, **options):
        for model_label, field in secrets_at_rest.ENCRYPTED_FIELDS:
            model = apps.get_model(model_label)
            rotated = 0
            for pk in model.objects.exclude(**{field: ""}).values_list("pk", flat=True):
                with transaction.atomic():
                    row = model.objects.select_for_update().get(pk=pk)
                    try:
                        new = secrets_at_rest.rotate(getattr(row, field))
                    except secrets_at_rest.SecretUnreadable:
                        raise CommandError(
                            f"{model_label} {pk}: its {field} cannot be decrypted with any key "
                            "of PROVIDER_CREDENTIAL_KEYS; put back the key it was encrypted "
                            "with (rows before it were re-encrypted, which is harmless)."
                        ) from None
                    model.objects.filter(pk=pk).update(**{field: new})
                rotated += 1
            self.stdout.write(f"{model_label}.{field}: re-encrypted {rotated}")
