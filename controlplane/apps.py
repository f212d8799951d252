from django.apps import AppConfig


class ControlplaneConfig(AppConfig):
    """Holds the platform-wide management commands (run_platform) and shared REST plumbing."""

    name = "controlplane"
