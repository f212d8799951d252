from django.core.management.base import BaseCommand


class VersionOptionCommand(BaseCommand):
    """A command whose --version names a model version (as in `catalog_import --version V`)
    instead of printing Django's version."""

    def add_base_argument(self, parser, *args, **kwargs):
        if "--version" in args:
            return
        super().add_base_argument(parser, *args, **kwargs)
