from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from catalog.artifacts import ArtifactStoreError
from catalog.progress import TransferProgress
from catalog.tiny import ensure_tiny_embedding, ensure_tiny_moe
from controlplane.errors import DomainError


class Command(BaseCommand):
    help = (
        "Build the tiny Mixtral-architecture MoE checkpoint (8 experts, 2 per token, a few MB, "
        "seeded, tokenizer built locally). With --out, only write the folder; without, import "
        "it into the artifact store as catalog model `mixtral-tiny` (builtin runtime, CPU "
        "profile, with prices). With --embedding, the same for the tiny BERT embedding model "
        "(`embed-tiny`). Safe to rerun."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", type=Path, metavar="DIR", help="write the checkpoint here")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--embedding", action="store_true", help="the tiny embedding model instead"
        )

    def handle(self, *args, out, seed, embedding, **options):
        if out is not None:
            if embedding:
                from runtime.tiny_embedding import build_tiny_embedding as build
            else:
                from runtime.tiny_moe import build_tiny_moe as build

            self.stdout.write(str(build(out, seed=seed)))
            return
        ensure = ensure_tiny_embedding if embedding else ensure_tiny_moe
        try:
            version = ensure(seed=seed, progress=TransferProgress())
        except (DomainError, ArtifactStoreError) as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"{version} ({version.status}): {version.artifacts.count()} files at "
            f"{version.artifact_uri}"
        )
