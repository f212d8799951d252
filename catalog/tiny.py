"""The tiny models as catalog models, served by the builtin runtime on CPU: `mixtral-tiny` (the
tiny MoE, chat and completions) and `embed-tiny` (a tiny BERT embedding model).

Each checkpoint comes from its one builder (runtime.tiny_moe.build_tiny_moe,
runtime.tiny_embedding.build_tiny_embedding) and goes into the store through the same import as
`catalog_import`, so the runtime downloads and verifies it like any other model.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from django.db import transaction

from catalog import seeds, services
from catalog.artifacts import ArtifactStore, get_store
from catalog.checkpoints import inspect_checkpoint
from catalog.models import HardwareProfile, Model, ModelVersion, ServingRuntime
from catalog.permissions import operator_system_actor
from controlplane.errors import ValidationFailed

TINY_SLUG = "mixtral-tiny"
TINY_TOKEN_PRICE = ("0.100000", "0.100000")
TINY_EMBEDDING_SLUG = "embed-tiny"
# An embedding model's price is per input token; it generates none.
TINY_EMBEDDING_TOKEN_PRICE = ("0.020000", "0.000000")
TINY_EMBEDDING_DESCRIPTION = """\
# Embed tiny

A real BERT-architecture embedding checkpoint in sentence-transformers' layout, only small: 2
layers, hidden size 128, a 1,024-token byte-level BPE vocabulary, a 512-token context; mean
pooling, unit-length vectors, Matryoshka `dimensions` 32, 64 or 128. Its weights are random
(seeded), so its vectors carry no meaning — it exists so that `/v1/embeddings` (limits,
budgets, usage, invoices) runs end to end on a laptop CPU.

Built locally by `manage.py make_tiny_moe --embedding`; nothing is downloaded.
"""
TINY_DESCRIPTION = """\
# Mixtral tiny

A real Mixtral-architecture checkpoint, only small: 2 layers, hidden size 128, 8 experts per
layer with 2 routed per token, a 1,024-token byte-level BPE vocabulary, a 2,048-token context.
Its weights are random (seeded), so its answers are noise — it exists so that the whole platform
(catalog, deployments, gateway, billing) runs end to end on a laptop CPU in seconds.

Built locally by `manage.py make_tiny_moe`; nothing is downloaded.
"""


def tiny_version_name(seed: int) -> str:
    return "v1" if seed == 0 else f"v1-seed{seed}"


def ensure_tiny_moe(*, seed: int = 0, store: ArtifactStore | None = None, progress=None):
    """Build, import and publish `mixtral-tiny` unless it is there already. Idempotent: a
    published version whose files are all in the store is left alone (no rebuild)."""

    def facts(checkpoint) -> dict:
        return {
            "display_name": "Mixtral tiny (CPU demo)",
            "publisher": "Sirocco",
            "family": "Mixtral",
            "description": TINY_DESCRIPTION,
            "tasks": [Model.Task.CHAT, Model.Task.COMPLETION],
            "languages": ["en"],
            "license": "Apache-2.0",
            "context_length": checkpoint.context_length,
            "architecture": Model.Architecture.MOE,
            "num_experts": checkpoint.num_experts,
            "experts_per_token": checkpoint.experts_per_token,
            "total_parameters": checkpoint.total_parameters,
            "active_parameters": checkpoint.active_parameters,
            "tags": ["moe", "tiny", "cpu", "demo"],
        }

    return _ensure_tiny(
        TINY_SLUG,
        ("tiny_moe", "build_tiny_moe"),
        facts,
        token_price=TINY_TOKEN_PRICE,
        seed=seed,
        store=store,
        progress=progress,
    )


def ensure_tiny_embedding(*, seed: int = 0, store: ArtifactStore | None = None, progress=None):
    """Build, import and publish `embed-tiny` unless it is there already (as ensure_tiny_moe)."""

    def facts(checkpoint) -> dict:
        return {
            "display_name": "Embed tiny (CPU demo)",
            "publisher": "Sirocco",
            "family": "BERT",
            "description": TINY_EMBEDDING_DESCRIPTION,
            "tasks": [Model.Task.EMBEDDINGS],
            "languages": ["en"],
            "license": "Apache-2.0",
            "context_length": checkpoint.context_length,
            "architecture": Model.Architecture.DENSE,
            "num_experts": None,
            "experts_per_token": None,
            "total_parameters": checkpoint.total_parameters,
            "active_parameters": checkpoint.total_parameters,
            "tags": ["embeddings", "tiny", "cpu", "demo"],
        }

    return _ensure_tiny(
        TINY_EMBEDDING_SLUG,
        ("tiny_embedding", "build_tiny_embedding"),
        facts,
        token_price=TINY_EMBEDDING_TOKEN_PRICE,
        seed=seed,
        store=store,
        progress=progress,
    )


def _ensure_tiny(slug, builder, facts, *, token_price, seed, store, progress):
    """The published version of a tiny model, built and imported only when missing."""
    store = store or get_store()
    seeds.ensure_runtimes_and_profiles()
    version = ModelVersion.objects.filter(
        model__slug=slug,
        version=tiny_version_name(seed),
        status=ModelVersion.Status.PUBLISHED,
    ).first()
    if version is None or not _stored_whole(version, store):
        with tempfile.TemporaryDirectory(prefix=f"sirocco-{slug}-") as folder:
            build = _builder(*builder)
            build(Path(folder), seed=seed)
            checkpoint = inspect_checkpoint(Path(folder))
            version = _import(
                checkpoint, slug, facts(checkpoint), seed=seed, store=store, progress=progress
            )
    cpu = HardwareProfile.objects.get(name=seeds.CPU_PROFILE)
    seeds.ensure_prices(
        version=version,
        token_price=token_price,
        profiles=[cpu],
        dedicated=lambda profile: profile.price_per_hour,
    )
    return version


def _builder(module: str, name: str):
    try:  # torch: imported only when building, and absent from the web image
        return getattr(importlib.import_module(f"runtime.{module}"), name)
    except ImportError as error:
        raise ValidationFailed(
            f"Building a tiny model needs the runtime extra ({error.name} is missing): "
            "pip install '.[runtime]', or import a built folder with catalog_import."
        ) from error


def _stored_whole(version: ModelVersion, store: ArtifactStore) -> bool:
    artifacts = list(version.artifacts.all())
    if not artifacts or not version.artifact_uri:
        return False
    prefix = services.artifact_prefix(version)
    for artifact in artifacts:
        stored = store.stat(f"{prefix}/{artifact.path}")
        if stored is None or stored.size != artifact.size_bytes:
            return False
    return True


def _import(
    checkpoint, slug: str, facts: dict, *, seed: int, store: ArtifactStore, progress
) -> ModelVersion:
    actor = operator_system_actor()
    folder = checkpoint.folder
    with transaction.atomic():
        model = Model.objects.filter(slug=slug).first()
        if model is None:
            model = services.model_create(actor=actor, slug=slug, **facts)
        else:
            model = services.model_update(actor=actor, model=model, **facts)
        version = model.versions.filter(version=tiny_version_name(seed)).first()
        if version is None:
            version = services.model_version_create(
                actor=actor,
                model=model,
                version=tiny_version_name(seed),
                serving_runtime=ServingRuntime.Name.BUILTIN,
                dtype=checkpoint.dtype,
                runtime_args={"max_model_len": checkpoint.context_length},
            )
    version = services.model_version_import(
        actor=actor, version=version, source=folder, store=store, progress=progress
    )
    return services.model_version_publish(actor=actor, version=version)


__all__ = ["TINY_EMBEDDING_SLUG", "TINY_SLUG", "ensure_tiny_embedding", "ensure_tiny_moe"]
