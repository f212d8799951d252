"""Reads of the catalog, shared by the REST API, the console, deployments, gateway and billing."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Prefetch, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from catalog import fit as fit_rules
from catalog.fit import Fit
from catalog.models import (
    DedicatedPrice,
    HardwareProfile,
    Model,
    ModelVersion,
    ServingRuntime,
    TokenPrice,
)
from controlplane.errors import NotFound

__all__ = [
    "Fit",
    "dedicated_price_at",
    "hardware_profile_list",
    "model_by_slug",
    "model_list",
    "profile_fit",
    "token_price_at",
    "token_price_ceiling",
]


def profile_fit(*, version: ModelVersion, profile: HardwareProfile) -> Fit:
    """Whether `version` fits one replica of `profile`, and in words why (not)."""
    return fit_rules.fit(version=version, profile=profile)


def token_price_at(*, version: ModelVersion, at: datetime) -> TokenPrice | None:
    """The serverless price of `version` in force at `at` (the latest one started by then)."""
    return (
        TokenPrice.objects.filter(model_version=version, effective_from__lte=at)
        .order_by("-effective_from", "-id")
        .first()
    )


def token_price_ceiling(
    *, version_id: int, now: datetime, horizon: timedelta
) -> tuple[Decimal, Decimal, str] | None:
    """The highest (input, output) price per million tokens, and its currency, of `version`
    in force at any moment from `now` to `now + horizon`: what a request admitted now may be
    rated at when it finishes. None when the version has no price then."""
    prices = list(
        TokenPrice.objects.filter(model_version_id=version_id, effective_from__lte=now + horizon)
        .order_by("-effective_from", "-id")
        .values_list("effective_from", "input_per_million", "output_per_million", "currency")
    )
    in_force = [p for p in prices if p[0] > now]
    in_force += [p for p in prices if p[0] <= now][:1]
    if not in_force:
        return None
    currency = in_force[-1][3]
    same = [p for p in in_force if p[3] == currency]
    return max(p[1] for p in same), max(p[2] for p in same), currency


def dedicated_price_at(
    *, version: ModelVersion, profile: HardwareProfile, at: datetime
) -> DedicatedPrice | None:
    """The hourly price of `version` on `profile` in force at `at`."""
    return (
        DedicatedPrice.objects.filter(
            model_version=version, hardware_profile=profile, effective_from__lte=at
        )
        .order_by("-effective_from", "-id")
        .first()
    )


def visible_models(*, organization) -> QuerySet[Model]:
    """Every model `organization` may see, in any state: public ones and its own private ones."""
    # Written as COALESCE(organization_id, 0) IN (0, org) rather than "IS NULL OR =": an OR
    # the organization index can serve makes SQLite fetch every public model through that
    # index and sort them, where a scan of the slug index stops after one page.
    owners = [0] if organization is None else [0, organization.pk]
    return Model.objects.alias(owner_id=Coalesce("organization_id", 0)).filter(owner_id__in=owners)


def model_list(*, organization, include_unpublished: bool = False) -> QuerySet[Model]:
    """Models `organization` may browse: public plus its private ones, with at least one
    published version unless `include_unpublished` (operators see drafts too)."""
    models = visible_models(organization=organization)
    if not include_unpublished:
        models = models.filter(is_listed=True)
    return models


def model_list_for_api(*, organization, operator: bool = False) -> QuerySet[Model]:
    """model_list with what a list item shows (published versions and current token prices)
    prefetched, so a page costs the same few queries whatever its size. Operators see every
    model, drafts and all organizations' private ones included."""
    now = timezone.now()
    versions = (
        ModelVersion.objects.filter(status=ModelVersion.Status.PUBLISHED)
        .select_related("serving_runtime")
        .prefetch_related(
            Prefetch(
                "token_prices",
                queryset=TokenPrice.objects.filter(effective_from__lte=now).order_by(
                    "-effective_from", "-id"
                ),
                to_attr="prices_in_force",
            )
        )
        .order_by("-published_at", "-id")
    )
    models = Model.objects.all() if operator else model_list(organization=organization)
    # The model card and the search columns can be long and a list item shows none of them.
    return models.defer("description", "search_text", "facets").prefetch_related(
        Prefetch("versions", queryset=versions, to_attr="published_versions")
    )


def model_by_slug(*, organization, slug: str, include_unpublished: bool = False) -> Model:
    """The model `slug` if `organization` may see it; NotFound otherwise (never revealing that
    another organization's private model exists)."""
    model = (
        model_list(organization=organization, include_unpublished=include_unpublished)
        .filter(slug=slug)
        .first()
    )
    if model is None:
        raise NotFound(f"No model {slug!r} in the catalog. List them at /api/v1/models.")
    return model


def model_versions_for_detail(*, model: Model, include_unpublished: bool = False):
    """A model's versions with runtime, artifacts and prices in force, newest first."""
    now = timezone.now()
    versions = model.versions.select_related(
        "serving_runtime", "provider_model__connection"
    ).prefetch_related(
        "artifacts",
        Prefetch(
            "token_prices",
            queryset=TokenPrice.objects.filter(effective_from__lte=now).order_by(
                "-effective_from", "-id"
            ),
        ),
        Prefetch(
            "dedicated_prices",
            queryset=DedicatedPrice.objects.filter(effective_from__lte=now).order_by(
                "-effective_from", "-id"
            ),
        ),
    )
    if not include_unpublished:
        versions = versions.exclude(status=ModelVersion.Status.DRAFT)
    return versions.order_by("-created_at", "-id")


def hardware_profile_list(*, include_inactive: bool = False) -> QuerySet[HardwareProfile]:
    profiles = HardwareProfile.objects.all()
    return profiles if include_inactive else profiles.filter(is_active=True)


def models_deployable_on(models: QuerySet[Model], profile: HardwareProfile) -> QuerySet[Model]:
    """`models` with a published version that fits `profile`, from the derived Model columns
    (the same rule as profile_fit: the least memory any published version needs)."""
    if profile.is_cpu:
        return models.filter(least_cpu_memory_gb__lte=fit_rules.profile_memory_gb(profile))
    return models.filter(least_gpu_memory_gb__lte=profile.total_gpu_memory_gb)


def version_features(version: ModelVersion) -> list[str]:
    """What a version serves through /v1, as its runtime and arguments make it: the builtin
    runtime constrains tools and JSON itself; vLLM by its structured-output backend, and picks
    tool calls out of free text (tool_choice auto) only with a tool-call parser
    (catalog/seeds.py)."""
    model = version.model
    if Model.Task.EMBEDDINGS in (model.tasks or []):
        return ["embeddings"]
    if version.is_partner:
        features = ["chat", "streaming"]
        if Model.Task.FUNCTION_CALLING in (model.tasks or []):
            features.append("tool calling (the provider's)")
        return features
    # logprobs / top_logprobs, n choices and seed: both runtimes (runtime/protocol.py; vLLM's).
    features = ["chat", "completions", "streaming", "logprobs", "n choices", "seed"]
    runtime = version.serving_runtime
    if runtime is not None and runtime.name == ServingRuntime.Name.BUILTIN:
        return [
            *features,
            "tool calling: auto, required, named, parallel",
            "JSON mode (json_object)",
            "structured outputs (json_schema, strict)",
        ]
    args = version.runtime_args or {}
    if args.get("--enable-auto-tool-choice") and args.get("--tool-call-parser"):
        features.append(
            f"tool calling: auto ({args['--tool-call-parser']} parser), required, named"
        )
    else:
        features.append("tool calling: required, named (no auto: no tool-call parser)")
    return [*features, "JSON mode (json_object)", "structured outputs (json_schema, strict)"]
