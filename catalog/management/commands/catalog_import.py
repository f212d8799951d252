from pathlib import Path

from django.core.management.base import CommandError

from catalog import services
from catalog.management.base import VersionOptionCommand
from catalog.models import Model, ModelVersion, ServingRuntime
from catalog.permissions import operator_system_actor
from catalog.progress import TransferProgress
from controlplane.errors import DomainError


class Command(VersionOptionCommand):
    help = (
        "Upload a Hugging Face checkpoint folder into the artifact store as the weights of a "
        "model version (created as a draft if new), with a manifest of sha256 digests. "
        "Interrupted uploads resume when rerun."
    )

    def add_arguments(self, parser):
        parser.add_argument("--from", dest="source", required=True, type=Path, metavar="DIR")
        parser.add_argument("--model", required=True, metavar="SLUG")
        parser.add_argument("--version", required=True, metavar="V")
        parser.add_argument(
            "--runtime",
            choices=ServingRuntime.Name.values,
            default=ServingRuntime.Name.VLLM,
            help="serving runtime of a new version (default: vllm)",
        )
        parser.add_argument("--publish", action="store_true", help="publish after the import")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args, source, model, version, runtime, publish, no_progress, **options):
        actor = operator_system_actor()
        catalog_model = Model.objects.filter(slug=model).first()
        if catalog_model is None:
            raise CommandError(
                f"No model {model!r} in the catalog. Create it first (REST API or admin)."
            )
        progress = TransferProgress(disable=True if no_progress else None)
        try:
            # A bad folder fails here, before anything is created.
            prepared = services.checkpoint_prepare(source=source, progress=progress)
        except DomainError as error:
            raise CommandError(f"Import failed, nothing changed: {error.message}") from error
        try:
            model_version = ModelVersion.objects.filter(
                model=catalog_model, version=version
            ).first()
            if model_version is None:
                model_version = services.model_version_create(
                    actor=actor,
                    model=catalog_model,
                    version=version,
                    serving_runtime=runtime,
                    dtype=prepared.checkpoint.dtype,
                )
                self.stdout.write(f"Created draft version {model_version}.")
            model_version = services.model_version_import(
                actor=actor, version=model_version, prepared=prepared, progress=progress
            )
            if publish:
                model_version = services.model_version_publish(actor=actor, version=model_version)
        except DomainError as error:
            raise CommandError(
                f"Import failed; {model}:{version} is not published: {error.message}"
            ) from error
        self.stdout.write(
            f"Imported {model_version.artifacts.count()} files "
            f"({model_version.size_bytes / 1e9:.3f} GB) to {model_version.artifact_uri}; "
            f"{model_version} is {model_version.status}."
        )
