from django.core.management.base import CommandError

from catalog import services
from catalog.artifacts import ArtifactStoreError
from catalog.management.base import VersionOptionCommand
from catalog.models import ModelVersion
from catalog.progress import TransferProgress


class Command(VersionOptionCommand):
    help = (
        "Re-read every imported model file from the artifact store and check its size and "
        "sha256 against the catalog. Reports each file; fails if any does not match."
    )

    def add_arguments(self, parser):
        parser.add_argument("--model", metavar="SLUG", help="only this model")
        parser.add_argument("--version", metavar="V", help="only this version (with --model)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args, model, version, no_progress, **options):
        if version and not model:
            raise CommandError("--version needs --model.")
        versions = ModelVersion.objects.exclude(artifact_uri="").select_related("model")
        if model:
            versions = versions.filter(model__slug=model)
        if version:
            versions = versions.filter(version=version)
        versions = list(versions.order_by("model__slug", "version"))
        if not versions:
            raise CommandError("No imported model versions match; nothing to verify.")
        failures = 0
        for model_version in versions:
            self.stdout.write(f"{model_version} ({model_version.artifact_uri})")
            total = sum(a.size_bytes for a in model_version.artifacts.all())
            progress = TransferProgress(disable=True if no_progress else None)
            progress.start("sha256", total)
            try:
                results = services.model_version_verify(
                    version=model_version, progress=progress.update
                )
            except ArtifactStoreError as error:
                raise CommandError(str(error)) from error
            finally:
                progress.close()
            for path, problem in results:
                self.stdout.write(
                    f"  {'FAILED' if problem else 'ok':6} {path}"
                    + (f": {problem}" if problem else "")
                )
                failures += bool(problem)
        if failures:
            raise CommandError(f"{failures} file(s) failed verification (listed above).")
        self.stdout.write("All files match their sha256.")
