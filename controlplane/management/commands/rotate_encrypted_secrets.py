"""Re-encrypt every stored secret with the first key of SECRETS_ENCRYPTION_KEYS, so that the
older keys can then be removed (controlplane/secrets_at_rest.py). Idempotent; each row is
rewritten in its own short transaction, so it may be stopped and run again."""

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import transaction

from controlplane import secrets_at_rest


class Command(BaseCommand):
    help = "Re-encrypt stored secrets with the newest key of SECRETS_ENCRYPTION_KEYS."

    def handle(self, *args, **options):
        for model_label, field in secrets_at_rest.ENCRYPTED_FIELDS:
            model = apps.get_model(model_label)
            rotated = 0
            for pk in model.objects.exclude(**{field: ""}).values_list("pk", flat=True):
                with transaction.atomic():
                    row = model.objects.select_for_update().get(pk=pk)
                    setattr(row, field, secrets_at_rest.rotate(getattr(row, field)))
                    row.save(update_fields=[field])
                rotated += 1
            self.stdout.write(f"{model_label}.{field}: re-encrypted {rotated}")
