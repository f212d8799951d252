from django.apps import AppConfig


class MeteringConfig(AppConfig):
    """Usage events: what each gateway request used. The gateway writes them, billing ingests
    them; both depend on this app and it depends on neither (tests/test_layout.py)."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "metering"
