"""Writes to the catalog. Operators only (see catalog.permissions); every change is audited."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from accounts.actors import Actor
from accounts.services import audit_record
from catalog import checkpoints
from catalog.artifacts import ArtifactStore, ArtifactStoreError, get_store
from catalog.fit import gpu_memory_utilization
from catalog.models import (
    DedicatedPrice,
    HardwareProfile,
    Model,
    ModelArtifact,
    ModelVersion,
    ServingRuntime,
    TokenPrice,
)
from catalog.permissions import require_operator
from catalog.selectors import profile_fit
from controlplane.errors import Conflict, ValidationFailed

logger = logging.getLogger(__name__)

MODEL_FIELDS = {
    "display_name",
    "publisher",
    "hosting",
    "family",
    "description",
    "tasks",
    "languages",
    "license",
    "context_length",
    "architecture",
    "num_experts",
    "experts_per_token",
    "total_parameters",
    "active_parameters",
    "tags",
}
VERSION_FIELDS = {
    "weights_format",
    "dtype",
    "size_bytes",
    "serving_runtime",
    "runtime_args",
    "served_model_name",
}
# A price may start a little in the past (clock skew, a slow request), never further: usage
# already rated at the old price must not change under an invoice.
PRICE_BACKDATE_GRACE = timedelta(minutes=5)


def _audit(actor: Actor, action: str, target, changes: dict | None = None) -> None:
    audit_record(actor=actor, action=action, target=target, changes=_jsonable(changes or {}))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal | datetime):
        return str(value)
    if hasattr(value, "_meta"):
        return str(value)
    return value


def _check_lists(fields: dict) -> None:
    tasks = fields.get("tasks")
    if tasks is not None:
        unknown = [t for t in tasks if t not in Model.Task.values]
        if unknown:
            raise ValidationFailed(
                f"Unknown task {unknown[0]!r}. Use any of: {', '.join(Model.Task.values)}.",
                field="tasks",
            )
    for name in ("tasks", "languages", "tags"):
        values = fields.get(name)
        if values is not None and len(set(values)) != len(values):
            raise ValidationFailed(f"{name} lists a value twice.", field=name)
    for name, most in (("languages", 100), ("tags", 20)):
        if fields.get(name) is not None and len(fields[name]) > most:
            raise ValidationFailed(f"Give at most {most} {name}.", field=name)
    languages = fields.get("languages")
    if languages is not None:
        bad = [x for x in languages if not (x.isascii() and x.isalpha() and len(x) in (2, 3))]
        if bad:
            raise ValidationFailed(
                f"{bad[0]!r} is not an ISO 639 language code; use e.g. en, fr, de.",
                field="languages",
            )


def _normalise_model_fields(fields: dict) -> dict:
    for name in ("languages", "tags"):
        if fields.get(name) is not None:
            fields[name] = [value.strip().lower() for value in fields[name]]
    if fields.get("architecture") == Model.Architecture.DENSE:
        fields.setdefault("num_experts", None)
        fields.setdefault("experts_per_token", None)
    return fields


def _check_model(model: Model) -> None:
    """Invariants that read better as a sentence than as a database constraint error."""
    if model.architecture == Model.Architecture.MOE:
        if not model.num_experts or not model.experts_per_token:
            raise ValidationFailed(
                "A mixture-of-experts model needs num_experts and experts_per_token.",
                field="num_experts",
            )
        if model.experts_per_token > model.num_experts:
            raise ValidationFailed(
                "experts_per_token cannot exceed num_experts.", field="experts_per_token"
            )
    elif model.num_experts or model.experts_per_token:
        raise ValidationFailed(
            "A dense model has no experts; leave num_experts and experts_per_token empty.",
            field="num_experts",
        )
    if model.active_parameters > model.total_parameters:
        raise ValidationFailed(
            "active_parameters cannot exceed total_parameters.", field="active_parameters"
        )
    if (model.visibility == Model.Visibility.PRIVATE) != (model.organization_id is not None):
        raise ValidationFailed(
            "A private model belongs to exactly one organization; a public one to none.",
            field="organization",
        )
    model.full_clean()


@transaction.atomic
def model_create(*, actor: Actor, slug: str, organization=None, **fields) -> Model:
    """Add a model to the catalog (public, or private to `organization`)."""
    require_operator(actor)
    unknown = set(fields) - MODEL_FIELDS
    if unknown:
        raise ValidationFailed(f"{sorted(unknown)[0]} is not a model field.", field=min(unknown))
    if Model.objects.filter(slug=slug).exists():
        raise Conflict(f"A model {slug!r} exists already; choose another slug.", field="slug")
    _check_lists(fields)
    model = Model(
        slug=slug,
        organization=organization,
        visibility=Model.Visibility.PRIVATE if organization else Model.Visibility.PUBLIC,
        **_normalise_model_fields(fields),
    )
    _check_model(model)
    model.save()
    _audit(actor, "catalog.model.create", model, {"slug": slug})
    return model


@transaction.atomic
def model_update(*, actor: Actor, model: Model, **fields) -> Model:
    require_operator(actor)
    unknown = set(fields) - MODEL_FIELDS
    if unknown:
        raise ValidationFailed(f"{sorted(unknown)[0]} cannot be changed.", field=min(unknown))
    _check_lists(fields)
    model = Model.objects.select_for_update().get(pk=model.pk)
    changes = {}
    for name, value in _normalise_model_fields(dict(fields)).items():
        if getattr(model, name) != value:
            changes[name] = [getattr(model, name), value]
            setattr(model, name, value)
    if "hosting" in changes and model.versions.exists():
        raise Conflict(
            f"{model.slug} has versions: whether it is self-hosted or partner-hosted is fixed "
            "once it has one. Make another model instead.",
            field="hosting",
        )
    if changes:
        _check_model(model)
        model.save()
        if "total_parameters" in changes:
            for version in model.versions.all():
                version.save()  # the parameter count feeds the memory requirements
        _audit(actor, "catalog.model.update", model, changes)
    return model


def _runtime(value) -> ServingRuntime:
    if isinstance(value, ServingRuntime):
        return value
    value = str(value)
    runtime = ServingRuntime.objects.filter(name=value).first()
    if runtime is None:
        names = ", ".join(ServingRuntime.objects.values_list("name", flat=True)) or "none yet"
        raise ValidationFailed(
            f"Unknown serving runtime {value!r}. Known: {names}.", field="serving_runtime"
        )
    return runtime


_SERVER_FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*$")


def _check_runtime_args(args, *, model: Model) -> None:
    if not isinstance(args, dict):
        raise ValidationFailed("runtime_args must be an object.", field="runtime_args")
    for key, value in args.items():
        if not isinstance(value, str | int | float | bool) or value is None:
            raise ValidationFailed(
                f"runtime_args.{key} must be a string, number or boolean.", field="runtime_args"
            )
        if key.startswith("-") and not _SERVER_FLAG.match(key):
            # Rendered as a server flag of its own (deployments/provisioners/manifests.py).
            raise ValidationFailed(
                f"runtime_args key {key!r}: a server flag is written --lowercase-with-hyphens "
                "(e.g. --runner).",
                field="runtime_args",
            )
    try:
        gpu_memory_utilization(args)
    except ValueError as error:
        raise ValidationFailed(str(error), field="runtime_args") from error
    max_model_len = args.get("max_model_len")
    if max_model_len is not None and (
        not isinstance(max_model_len, int)
        or isinstance(max_model_len, bool)
        or not 0 < max_model_len <= model.context_length
    ):
        raise ValidationFailed(
            f"runtime_args.max_model_len must be a whole number from 1 to the model's context "
            f"length ({model.context_length}).",
            field="runtime_args",
        )


@transaction.atomic
def model_version_create(
    *, actor: Actor, model: Model, version: str, serving_runtime=None, **fields
) -> ModelVersion:
    """A new draft version. Import its weights (a partner model's: map it to its provider
    model, catalog.providers), then publish it."""
    require_operator(actor)
    unknown = set(fields) - VERSION_FIELDS
    if unknown:
        raise ValidationFailed(f"{sorted(unknown)[0]} is not a version field.", field=min(unknown))
    if ModelVersion.objects.filter(model=model, version=version).exists():
        raise Conflict(f"{model.slug} has a version {version!r} already.", field="version")
    fields.setdefault("runtime_args", {})
    _check_runtime_args(fields["runtime_args"], model=model)
    if model.is_partner:
        if serving_runtime is not None:
            raise ValidationFailed(
                f"{model.slug} is partner-hosted: its provider serves it, so a version has no "
                "serving_runtime.",
                field="serving_runtime",
            )
        runtime = None
    elif serving_runtime is None:
        raise ValidationFailed("Give the serving_runtime.", field="serving_runtime")
    else:
        runtime = _runtime(serving_runtime)
    model_version = ModelVersion(model=model, version=version, serving_runtime=runtime, **fields)
    model_version.full_clean()
    model_version.save()
    _audit(actor, "catalog.version.create", model_version, {"version": version})
    return model_version


@transaction.atomic
def model_version_update(*, actor: Actor, version: ModelVersion, **fields) -> ModelVersion:
    """Change a draft. Published versions are what deployments run: make a new version."""
    require_operator(actor)
    unknown = set(fields) - VERSION_FIELDS
    if unknown:
        raise ValidationFailed(f"{sorted(unknown)[0]} cannot be changed.", field=min(unknown))
    version = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
    if version.status != ModelVersion.Status.DRAFT:
        raise Conflict(
            f"{version} is {version.status}; only drafts change. Create a new version instead."
        )
    if "serving_runtime" in fields:
        if version.model.is_partner:
            raise ValidationFailed(
                "A partner-hosted model's version has no serving_runtime.", field="serving_runtime"
            )
        fields["serving_runtime"] = _runtime(fields["serving_runtime"])
    if "runtime_args" in fields:
        _check_runtime_args(fields["runtime_args"], model=version.model)
    changes = {}
    for name, value in fields.items():
        if getattr(version, name) != value:
            changes[name] = [getattr(version, name), value]
            setattr(version, name, value)
    if changes:
        version.full_clean()
        version.save()
        _audit(actor, "catalog.version.update", version, changes)
    return version


@transaction.atomic
def model_version_publish(*, actor: Actor, version: ModelVersion) -> ModelVersion:
    """Make a draft browsable and deployable. Idempotent."""
    require_operator(actor)
    version = ModelVersion.objects.select_for_update().get(pk=version.pk)
    if version.status == ModelVersion.Status.PUBLISHED:
        return version
    if version.status == ModelVersion.Status.DEPRECATED:
        raise Conflict(f"{version} is deprecated; publish a new version instead.")
    version.status = ModelVersion.Status.PUBLISHED
    version.published_at = timezone.now()
    version.save(update_fields=["status", "published_at"])
    _audit(actor, "catalog.version.publish", version)
    return version


@transaction.atomic
def model_version_deprecate(*, actor: Actor, version: ModelVersion) -> ModelVersion:
    """Stop offering a version for new deployments; existing ones keep running. Idempotent."""
    require_operator(actor)
    version = ModelVersion.objects.select_for_update().get(pk=version.pk)
    if version.status == ModelVersion.Status.DEPRECATED:
        return version
    if version.status == ModelVersion.Status.DRAFT:
        raise Conflict(f"{version} was never published; there is nothing to deprecate.")
    version.status = ModelVersion.Status.DEPRECATED
    version.deprecated_at = timezone.now()
    version.save(update_fields=["status", "deprecated_at"])
    _audit(actor, "catalog.version.deprecate", version)
    return version


def _check_effective_from(effective_from: datetime | None, *, allow_past: bool) -> datetime:
    now = timezone.now()
    if effective_from is None:
        return now
    if timezone.is_naive(effective_from):
        raise ValidationFailed("Give effective_from with a time zone.", field="effective_from")
    if not allow_past and effective_from < now - PRICE_BACKDATE_GRACE:
        raise ValidationFailed(
            "effective_from is in the past: usage already rated at the old price would change. "
            "Give a time from now on.",
            field="effective_from",
        )
    return effective_from


@transaction.atomic
def token_price_set(
    *,
    actor: Actor,
    version: ModelVersion,
    input_per_million: Decimal,
    output_per_million: Decimal,
    cached_input_per_million: Decimal | None = None,
    currency: str = "USD",
    effective_from: datetime | None = None,
    allow_past: bool = False,
) -> TokenPrice:
    """Add a serverless price, in force from `effective_from` (default now) on. Prices are
    never edited: the old one stays for the usage rated while it was in force. Cached prompt
    tokens cost `cached_input_per_million` (at most the input price), or the input price."""
    require_operator(actor)
    for name, value in (
        ("input_per_million", input_per_million),
        ("output_per_million", output_per_million),
        ("cached_input_per_million", cached_input_per_million),
    ):
        if value is not None and not isinstance(value, Decimal):
            raise ValidationFailed(f"{name} must be a Decimal, never a float.", field=name)
    if cached_input_per_million is not None and cached_input_per_million > input_per_million:
        raise ValidationFailed(
            "cached_input_per_million is a discount: it cannot be over input_per_million.",
            field="cached_input_per_million",
        )
    effective_from = _check_effective_from(effective_from, allow_past=allow_past)
    if TokenPrice.objects.filter(model_version=version, effective_from=effective_from).exists():
        raise Conflict("A price starting at that moment exists already.", field="effective_from")
    price = TokenPrice(
        model_version=version,
        currency=currency,
        input_per_million=input_per_million,
        cached_input_per_million=cached_input_per_million,
        output_per_million=output_per_million,
        effective_from=effective_from,
    )
    price.full_clean()
    price.save()
    _audit(
        actor,
        "catalog.token_price.set",
        version,
        {
            "currency": currency,
            "input_per_million": input_per_million,
            "cached_input_per_million": cached_input_per_million,
            "output_per_million": output_per_million,
            "effective_from": effective_from,
        },
    )
    return price


@transaction.atomic
def dedicated_price_set(
    *,
    actor: Actor,
    version: ModelVersion,
    profile: HardwareProfile,
    per_hour: Decimal,
    currency: str = "USD",
    effective_from: datetime | None = None,
    allow_past: bool = False,
) -> DedicatedPrice:
    """Add a dedicated (per replica-hour) price on a profile the version fits."""
    require_operator(actor)
    if not isinstance(per_hour, Decimal):
        raise ValidationFailed("per_hour must be a Decimal, never a float.", field="per_hour")
    fit = profile_fit(version=version, profile=profile)
    if not fit.fits:
        raise ValidationFailed(
            f"{version} does not fit {profile.name}: {fit.reason}.", field="hardware_profile"
        )
    effective_from = _check_effective_from(effective_from, allow_past=allow_past)
    if DedicatedPrice.objects.filter(
        model_version=version, hardware_profile=profile, effective_from=effective_from
    ).exists():
        raise Conflict("A price starting at that moment exists already.", field="effective_from")
    price = DedicatedPrice(
        model_version=version,
        hardware_profile=profile,
        currency=currency,
        per_hour=per_hour,
        effective_from=effective_from,
    )
    price.full_clean()
    price.save()
    _audit(
        actor,
        "catalog.dedicated_price.set",
        version,
        {
            "hardware_profile": profile.name,
            "currency": currency,
            "per_hour": per_hour,
            "effective_from": effective_from,
        },
    )
    return price


def artifact_prefix(version: ModelVersion) -> str:
    return f"models/{version.model.slug}/{version.version}"


@dataclass(frozen=True)
class PreparedCheckpoint:
    checkpoint: checkpoints.Checkpoint
    manifest: dict


def checkpoint_prepare(*, source: Path, progress=None) -> PreparedCheckpoint:
    """Check a checkpoint folder whole and hash every file, before anything is created or sent:
    a missing config.json, a truncated shard or a file that contradicts the folder's own
    manifest is a ValidationFailed naming the file."""
    try:
        checkpoint = checkpoints.inspect_checkpoint(source)
        if progress:
            progress.start("sha256", checkpoint.size_bytes)
        manifest = checkpoints.build_manifest(checkpoint, progress.update if progress else None)
    except checkpoints.CheckpointError as error:
        raise ValidationFailed(str(error), field="source") from error
    finally:
        if progress:
            progress.close()
    return PreparedCheckpoint(checkpoint=checkpoint, manifest=manifest)


def model_version_import(
    *,
    actor: Actor,
    version: ModelVersion,
    source: Path | None = None,
    prepared: PreparedCheckpoint | None = None,
    store: ArtifactStore | None = None,
    progress=None,
) -> ModelVersion:
    """Upload a checkpoint folder (`source`, or one `checkpoint_prepare` checked already) as the
    weights of `version`, with manifest.json, and record every file (path, size, sha256).

    Not one transaction: uploading 93 GB takes long. The folder is checked whole before the first
    byte goes up (a bad folder changes nothing); files already stored with the same sha256 are
    skipped, so a rerun after an interruption resumes; rows change only at the end, atomically.
    A published version's weights never change: importing other content into it is a Conflict.
    """
    require_operator(actor)
    store = store or get_store()
    if prepared is None:
        prepared = checkpoint_prepare(source=source, progress=progress)
    checkpoint, manifest = prepared.checkpoint, prepared.manifest

    recorded = {
        (a.path, a.size_bytes, a.sha256) for a in ModelArtifact.objects.filter(version=version)
    }
    wanted = {(e["path"], e["size"], e["sha256"]) for e in manifest["files"]}
    if version.status != ModelVersion.Status.DRAFT and recorded != wanted:
        raise Conflict(
            f"{version} is {version.status}: its weights cannot change. "
            "Create a new version for new weights."
        )

    prefix = artifact_prefix(version)
    try:
        _upload(store, prefix, checkpoint, manifest, progress)
    except ArtifactStoreError as error:
        raise ValidationFailed(f"Upload failed, nothing was recorded: {error}") from error

    with transaction.atomic():
        version = (
            ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        )
        ModelArtifact.objects.filter(version=version).exclude(
            path__in=[e["path"] for e in manifest["files"]]
        ).delete()
        for entry in manifest["files"]:
            ModelArtifact.objects.update_or_create(
                version=version,
                path=entry["path"],
                defaults={"size_bytes": entry["size"], "sha256": entry["sha256"]},
            )
        changes = {
            "artifact_uri": store.uri(prefix),
            "size_bytes": checkpoint.size_bytes,
            "weights_format": ModelVersion.WeightsFormat.SAFETENSORS,
        }
        if version.status == ModelVersion.Status.DRAFT:
            changes["dtype"] = checkpoint.dtype
        changed = {k: v for k, v in changes.items() if getattr(version, k) != v}
        for name, value in changed.items():
            setattr(version, name, value)
        if changed:
            version.save()
        if changed or recorded != wanted:
            _audit(
                actor,
                "catalog.version.import",
                version,
                {**changed, "files": len(manifest["files"])},
            )
    return version


def _upload(store: ArtifactStore, prefix: str, checkpoint, manifest: dict, progress) -> None:
    """Put every file not already stored with the same sha256; the manifest goes last, so a
    store with a manifest holds every file it lists."""
    entries = manifest["files"]
    pending = []
    for entry in entries:
        existing = store.stat(f"{prefix}/{entry['path']}")
        if existing and existing.size == entry["size"] and existing.sha256 == entry["sha256"]:
            continue
        pending.append(entry)
    if progress:
        progress.start("upload", sum(e["size"] for e in pending))
    for entry in pending:
        store.put_file(
            f"{prefix}/{entry['path']}",
            checkpoint.folder / entry["path"],
            sha256=entry["sha256"],
            progress=progress.update if progress else None,
        )
    manifest_key = f"{prefix}/{checkpoints.MANIFEST_NAME}"
    data = checkpoints.manifest_bytes(manifest)
    current = store.stat(manifest_key)
    if current is None or current.size != len(data) or store.read_bytes(manifest_key) != data:
        store.put_bytes(manifest_key, data)
    # Files a previous import of other content left behind would be downloaded by the runtime.
    keep = {f"{prefix}/{e['path']}" for e in entries} | {manifest_key}
    for stored in store.list(f"{prefix}/"):
        if stored.key not in keep:
            store.delete(stored.key)
    if progress:
        progress.close()


def model_version_verify(
    *, version: ModelVersion, store: ArtifactStore | None = None, progress=None
):
    """Re-read every artifact of `version` from the store and compare size and sha256 with its
    row. Returns one (path, problem or "") per file, the manifest included."""
    store = store or get_store()
    prefix = artifact_prefix(version)
    results = []
    artifacts = list(version.artifacts.order_by("path"))
    for artifact in artifacts:
        key = f"{prefix}/{artifact.path}"
        stored = store.stat(key)
        if stored is None:
            results.append((artifact.path, "missing from the store"))
            continue
        if stored.size != artifact.size_bytes:
            results.append(
                (artifact.path, f"size {stored.size} bytes, expected {artifact.size_bytes}")
            )
            continue
        digest = store.compute_sha256(key, progress)
        if digest != artifact.sha256:
            results.append(
                (artifact.path, f"sha256 {digest}, expected {artifact.sha256} (corrupted)")
            )
        else:
            results.append((artifact.path, ""))
    results.append((checkpoints.MANIFEST_NAME, _manifest_problem(store, prefix, artifacts)))
    return results


def _manifest_problem(store, prefix, artifacts) -> str:
    import json

    key = f"{prefix}/{checkpoints.MANIFEST_NAME}"
    if store.stat(key) is None:
        return "missing from the store"
    try:
        listed = {
            (e["path"], e["size"], e["sha256"]) for e in json.loads(store.read_bytes(key))["files"]
        }
    except (ValueError, KeyError, TypeError):
        return "not a valid manifest"
    if listed != {(a.path, a.size_bytes, a.sha256) for a in artifacts}:
        return "does not list the recorded files"
    return ""
