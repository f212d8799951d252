from django.apps import AppConfig


class ControlplaneConfig(AppConfig):
    """Holds the platform-wide management commands (run_platform) and shared REST plumbing."""

    name = "controlplane"

    def ready(self):
        from controlplane import checks  # noqa: F401 - registers our system checks

        # Registers the OpenAPI schemes and schema extensions (drf-spectacular).
        from controlplane.rest import schema  # noqa: F401
