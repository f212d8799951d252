"""The tiny MoE as a catalog model: `mixtral-tiny`, served by the builtin runtime on CPU.

The checkpoint comes from runtime.tiny_moe.build_tiny_moe (the one builder) and goes into the
store through the same import as `catalog_import`, so the runtime downloads and verifies it like
any other model.
"""

from __future__ import annotations

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
    store = store or get_store()
    seeds.ensure_runtimes_and_profiles()
    existing = ModelVersion.objects.filter(
        model__slug=TINY_SLUG,
        version=tiny_version_name(seed),
        status=ModelVersion.Status.PUBLISHED,
    ).first()
    if existing is not None and _stored_whole(existing, store):
        version = existing
    else:
        with tempfile.TemporaryDirectory(prefix="sirocco-tiny-moe-") as folder:
            try:  # torch: imported only when building, and absent from the web image
                from runtime.tiny_moe import build_tiny_moe
            except ImportError as error:
                raise ValidationFailed(
                    f"Building the tiny MoE needs the runtime extra ({error.name} is missing): "
                    "pip install '.[runtime]', or import a built folder with catalog_import."
                ) from error

            build_tiny_moe(Path(folder), seed=seed)
            version = _import(Path(folder), seed=seed, store=store, progress=progress)
    cpu = HardwareProfile.objects.get(name=seeds.CPU_PROFILE)
    seeds.ensure_prices(
        version=version,
        token_price=TINY_TOKEN_PRICE,
        profiles=[cpu],
        dedicated=lambda profile: profile.price_per_hour,
    )
    return version


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


def _import(folder: Path, *, seed: int, store: ArtifactStore, progress) -> ModelVersion:
    actor = operator_system_actor()
    checkpoint = inspect_checkpoint(folder)
    facts = {
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
    with transaction.atomic():
        model = Model.objects.filter(slug=TINY_SLUG).first()
        if model is None:
            model = services.model_create(actor=actor, slug=TINY_SLUG, **facts)
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


__all__ = ["TINY_SLUG", "ensure_tiny_moe"]
