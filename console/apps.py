from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "console"

    def ready(self):
        # Connects the receiver that revokes a session's playground key at logout.
        from console.views import playground  # noqa: F401
