"""Reads of deployments: the REST API, the console, the gateway and billing share these."""

from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

from django.db.models import Exists, OuterRef, Prefetch, QuerySet, Subquery
from django.db.models.functions import Now

from accounts.models import Organization
from deployments.models import (
    Deployment,
    DeploymentEvent,
    Fallback,
    Replica,
    RoutingPolicy,
    UpstreamCircuit,
)

PLATFORM_ORGANIZATION_SLUG = "platform"

# What a caller may send requests to: everything not being (or already) torn down.
CALLABLE_STATUSES = (
    Deployment.Status.PENDING,
    Deployment.Status.PROVISIONING,
    Deployment.Status.READY,
    Deployment.Status.SCALING,
    Deployment.Status.UPDATING,
    Deployment.Status.FAILED,
)


@dataclass(frozen=True)
class Route:
    """Where the gateway sends a request for `model` of an organization (see CONTRACTS.md)."""

    deployment_id: UUID
    organization_id: int
    model_version_id: int
    served_model_name: str
    max_model_len: int | None
    deployment_type: str
    status: str
    replicas: list[tuple[str, str]] = field(default_factory=list)
    can_scale_from_zero: bool = False
    # A partner-hosted model: who publishes it, where its provider is (None: no usable
    # connection), and the terms version the organization has yet to accept (None: accepted,
    # or none). The upstream is then the provider instead of replicas.
    partner_publisher: str | None = None
    provider: object | None = None  # catalog.providers.PartnerTarget
    terms_pending: str | None = None
    terms_accept_path: str = ""
    routing_policy: str = RoutingPolicy.PREFIX_AWARE
    # The names of the deployment's fallback targets, in order (gateway/fallback.py).
    fallbacks: tuple[str, ...] = ()

    @property
    def prefix_aware(self) -> bool:
        return self.routing_policy == RoutingPolicy.PREFIX_AWARE

    # Which project's keys may call it: the owner's, and every project's when shared.
    project_id: int | None = None
    shared: bool = True


class CallableModel(NamedTuple):
    name: str
    created: int  # Unix seconds, as OpenAI's GET /v1/models shows it
    # Who may call it (the gateway filters per key): the owning project, or every project.
    project_id: int
    shared: bool


def deployment_list(*, organization: Organization) -> QuerySet[Deployment]:
    """An organization's deployments, deleted ones included (the API filters by status)."""
    return (
        Deployment.objects.filter(organization=organization)
        .select_related(
            "model_version__model", "hardware_profile", "serving_runtime", "pool__hardware_profile"
        )
        .prefetch_related(
            Prefetch("replicas", queryset=Replica.objects.order_by("name")),
            Prefetch(
                "fallbacks",
                queryset=Fallback.objects.select_related("target__model_version__model").order_by(
                    "position"
                ),
            ),
            Prefetch("circuits", queryset=UpstreamCircuit.objects.order_by("upstream", "source")),
        )
    )


def deployment_get(*, organization: Organization, deployment_id) -> Deployment | None:
    return deployment_list(organization=organization).filter(pk=deployment_id).first()


def deployment_events(*, deployment: Deployment) -> QuerySet[DeploymentEvent]:
    return DeploymentEvent.objects.filter(deployment=deployment)


def serving_replicas(deployment: Deployment) -> list[Replica]:
    """The replicas that answer for a deployment: its own, or its pool's when serverless."""
    source = deployment.pool if deployment.pool_id else deployment
    return list(source.replicas.all())


def route_for(*, organization_id: int, model: str) -> Route | None:
    """The route for `model` as the organization calls it, or None (the gateway says 404).

    Three queries: the deployment (with its version, pool and whether the organization
    accepted the version's terms in force), its fallback targets and the ready replicas. The
    gateway caches the answer for a few seconds.
    """
    deployment = (
        Deployment.objects.filter(
            organization_id=organization_id, name=model, status__in=CALLABLE_STATUSES
        )
        .annotate(**_terms_annotations())
        .select_related("model_version__model", "pool")
        .only(
            "id",
            "organization_id",
            "project_id",
            "shared",
            "type",
            "status",
            "min_replicas",
            "max_replicas",
            "pool_id",
            "pool__id",
            "pool__status",
            "pool__min_replicas",
            "pool__max_replicas",
            "pool__routing_policy",
            "routing_policy",
            "model_version__id",
            "model_version__served_model_name",
            "model_version__runtime_args",
            "model_version__version",
            "model_version__model__slug",
            "model_version__model__context_length",
            "model_version__model__hosting",
            "model_version__model__publisher",
        )
        .first()
    )
    if deployment is None:
        return None
    fallbacks = fallback_targets(deployment_id=deployment.pk)
    if deployment.model_version.is_partner:
        return _partner_route(deployment, fallbacks)
    serving = deployment.pool if deployment.pool_id else deployment
    replicas = list(
        Replica.objects.filter(deployment_id=serving.pk, ready=True)
        .exclude(endpoint="")
        .order_by("name")
        .values_list("name", "endpoint")
    )
    version = deployment.model_version
    return Route(
        deployment_id=deployment.pk,
        organization_id=deployment.organization_id,
        model_version_id=version.pk,
        served_model_name=version.served_model_name or version.model.slug,
        max_model_len=max_model_len(version),
        deployment_type=deployment.type,
        # A publisher's self-hosted model has terms too: refused until they are accepted.
        terms_pending=_terms_pending(deployment),
        terms_accept_path=_terms_accept_path(version),
        # A serverless entry is ready as soon as it exists; whether a request can be served
        # (or must wait) is its pool's status.
        status=serving.status
        if deployment.pool_id and deployment.status == Deployment.Status.READY
        else deployment.status,
        replicas=[tuple(r) for r in replicas],
        routing_policy=serving.routing_policy,
        fallbacks=fallbacks,
        can_scale_from_zero=(
            serving.min_replicas == 0
            and serving.max_replicas > 0
            and serving.status != Deployment.Status.FAILED
            and deployment.status != Deployment.Status.FAILED
        ),
        project_id=deployment.project_id,
        shared=deployment.shared,
    )


def _partner_route(deployment: Deployment, fallbacks: tuple[str, ...]) -> Route:
    """A partner model's entry: no replicas; its provider (credential decrypted for the
    gateway) and whether the organization accepted the terms in force (route_for's query)."""
    from catalog.providers import partner_target

    version = deployment.model_version
    return Route(
        deployment_id=deployment.pk,
        organization_id=deployment.organization_id,
        model_version_id=version.pk,
        served_model_name=version.served_model_name or version.model.slug,
        max_model_len=max_model_len(version),
        deployment_type=deployment.type,
        status=deployment.status,
        partner_publisher=version.model.publisher,
        provider=partner_target(version_id=version.pk),
        terms_pending=_terms_pending(deployment),
        terms_accept_path=_terms_accept_path(version),
        project_id=deployment.project_id,
        shared=deployment.shared,
        fallbacks=fallbacks,
    )


def fallback_targets(*, deployment_id) -> tuple[str, ...]:
    """The names of a deployment's fallback targets that can take requests, in order."""
    return tuple(
        Fallback.objects.filter(deployment_id=deployment_id, target__status__in=CALLABLE_STATUSES)
        .exclude(target__status=Deployment.Status.FAILED)
        .order_by("position")
        .values_list("target__name", flat=True)
    )


def _terms_annotations() -> dict:
    """For route_for's query: the version of the terms in force for the deployment's model
    version (catalog.terms.terms_in_force's rule), and whether its organization accepted them."""
    from catalog.models import TermsAcceptance, TermsOfUse

    def in_force(version_ref):
        return TermsOfUse.objects.filter(
            model_version_id=version_ref, effective_from__lte=Now()
        ).order_by("-effective_from", "-id")

    return {
        "terms_version": Subquery(in_force(OuterRef("model_version_id")).values("version")[:1]),
        "terms_accepted": Exists(
            TermsAcceptance.objects.filter(
                organization_id=OuterRef("organization_id"),
                # Nested one level deeper: the deployment's version is two queries out.
                terms_id=Subquery(
                    in_force(OuterRef(OuterRef("model_version_id"))).values("pk")[:1]
                ),
            )
        ),
    }


def _terms_pending(deployment: Deployment) -> str | None:
    """The version of the terms in force the organization has yet to accept (None: accepted,
    or the model has none), from route_for's annotations."""
    if deployment.terms_version is None or deployment.terms_accepted:
        return None
    return deployment.terms_version


def _terms_accept_path(version) -> str:
    return f"/api/v1/models/{version.model.slug}/versions/{version.version}/terms/accept"


def callable_models(*, organization_id: int) -> list[CallableModel]:
    """The model names an organization may call (its deployments), for GET /v1/models."""
    rows = (
        Deployment.objects.filter(organization_id=organization_id, status__in=CALLABLE_STATUSES)
        .order_by("name")
        .values_list("name", "created_at", "project_id", "shared")
    )
    return [
        CallableModel(name, int(created.timestamp()), project_id, shared)
        for name, created, project_id, shared in rows
    ]


def max_model_len(version) -> int | None:
    """The context length the runtime serves: the version's runtime args, else the model's."""
    configured = (version.runtime_args or {}).get("max_model_len")
    if configured:
        return int(configured)
    return version.model.context_length or None


def pool_for(*, model_version) -> Deployment | None:
    """The platform's shared serverless pool serving this model version, if it offers one."""
    return (
        Deployment.objects.filter(
            organization__slug=PLATFORM_ORGANIZATION_SLUG,
            type=Deployment.Type.SERVERLESS,
            pool__isnull=True,
            model_version=model_version,
            status__in=CALLABLE_STATUSES,
        )
        .exclude(status=Deployment.Status.FAILED)
        .order_by("created_at")
        .first()
    )


def organization_gpu_usage(*, organization: Organization, exclude_id=None) -> int:
    """GPUs the organization's dedicated deployments may hold at their maximum replica count."""
    deployments = Deployment.objects.filter(
        organization=organization,
        type=Deployment.Type.DEDICATED,
        status__in=Deployment.LIVE_STATUSES,
    ).select_related("hardware_profile")
    if exclude_id is not None:
        deployments = deployments.exclude(pk=exclude_id)
    return sum(d.max_replicas * (d.hardware_profile.gpu_count or 0) for d in deployments)
