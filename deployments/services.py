"""Writes of deployments: what customers ask for (create, update, delete), what the gateway
reports (load, scale-from-zero), and what the reconciler observes (status, events, replicas)."""

import math
import re
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import Organization
from accounts.roles import Permission
from accounts.services import audit_record, require
from controlplane.errors import (
    Conflict,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    ValidationFailed,
)
from deployments import transitions
from deployments.models import (
    NAME_MAX_LENGTH,
    Deployment,
    Fallback,
    LoadReport,
    Replica,
    RoutingPolicy,
    UpstreamCircuit,
    dns_name_validator,
)
from deployments.selectors import PLATFORM_ORGANIZATION_SLUG, organization_gpu_usage, pool_for


def _catalog():
    # Imported late: catalog is a sibling app that may import deployments' selectors later.
    from catalog import models as catalog_models
    from catalog import selectors as catalog_selectors

    return catalog_models, catalog_selectors


def _resolve_version(*, organization, model: str, version: str | None):
    catalog_models, catalog_selectors = _catalog()
    try:
        found = catalog_selectors.model_by_slug(organization=organization, slug=model)
    except NotFound:
        raise ValidationFailed(
            f"Unknown model {model!r}. List the catalog with GET /api/v1/models.", field="model"
        ) from None
    versions = found.versions.filter(status=catalog_models.ModelVersion.Status.PUBLISHED)
    if version:
        chosen = versions.filter(version=version).first()
        if chosen is None:
            offered = ", ".join(versions.values_list("version", flat=True)) or "none"
            raise ValidationFailed(
                f"{model} has no published version {version!r} (published: {offered}).",
                field="version",
            )
        return chosen
    chosen = versions.order_by(F("published_at").desc(nulls_last=True), "-id").first()
    if chosen is None:
        raise ValidationFailed(f"{model} has no published version yet.", field="model")
    return chosen


def _resolve_profile(name: str):
    catalog_models, _ = _catalog()
    profile = catalog_models.HardwareProfile.objects.filter(name=name, is_active=True).first()
    if profile is None:
        active = catalog_models.HardwareProfile.objects.filter(is_active=True)
        raise ValidationFailed(
            f"Unknown hardware profile {name!r}. Use one of: "
            f"{', '.join(active.values_list('name', flat=True)) or 'none defined'} "
            "(GET /api/v1/hardware-profiles).",
            field="hardware_profile",
        )
    return profile


def _check_fit(*, version, profile) -> None:
    _, catalog_selectors = _catalog()
    fit = catalog_selectors.profile_fit(version=version, profile=profile)
    if not fit.fits:
        raise ValidationFailed(
            f"{version.model.slug} {version.version} does not fit {profile.name}: {fit.reason}.",
            field="hardware_profile",
        )


def _check_gpu_quota(*, organization, profile, max_replicas: int, exclude_id=None) -> None:
    needed = max_replicas * (profile.gpu_count or 0)
    if not needed:
        return
    used = organization_gpu_usage(organization=organization, exclude_id=exclude_id)
    if used + needed > organization.max_gpus:
        raise QuotaExceeded(
            f"max_gpus: this deployment needs {needed} GPUs ({max_replicas} replicas × "
            f"{profile.gpu_count} {profile.gpu_model or 'GPU'}); your organization uses {used} "
            f"of {organization.max_gpus}. Lower max_replicas, delete a deployment, or ask the "
            "platform team for a higher quota.",
            field="max_replicas",
        )


def _check_deployment_quota(organization) -> None:
    live = Deployment.objects.filter(
        organization=organization, status__in=Deployment.LIVE_STATUSES
    ).count()
    if live >= organization.max_deployments:
        raise QuotaExceeded(
            f"max_deployments: your organization has {live} of {organization.max_deployments} "
            "deployments. Delete one, or ask the platform team for a higher quota."
        )


def _check_replicas(*, min_replicas: int, max_replicas: int) -> None:
    if min_replicas < 0:
        raise ValidationFailed("min_replicas cannot be negative.", field="min_replicas")
    if max_replicas < 1:
        raise ValidationFailed("max_replicas must be at least 1.", field="max_replicas")
    if min_replicas > max_replicas:
        raise ValidationFailed(
            f"min_replicas ({min_replicas}) cannot exceed max_replicas ({max_replicas}).",
            field="min_replicas",
        )
    limit = settings.DEPLOYMENTS_MAX_REPLICAS
    if max_replicas > limit:
        raise ValidationFailed(f"max_replicas can be at most {limit}.", field="max_replicas")


def _check_name(organization, name: str) -> None:
    from django.core.exceptions import ValidationError

    try:
        dns_name_validator(name)
    except ValidationError as error:
        raise ValidationFailed(error.messages[0], field="name") from None
    if (
        Deployment.objects.filter(organization=organization, name=name)
        .exclude(status=Deployment.Status.DELETED)
        .exists()
    ):
        raise Conflict(
            f"Your organization already has a deployment named {name!r}; choose another name "
            "(or delete that one first).",
            field="name",
            code="name_taken",
        )


def _check_price(*, deployment_type: str, version, profile) -> None:
    _, catalog_selectors = _catalog()
    now = timezone.now()
    label = f"{version.model.slug} {version.version}"
    if deployment_type == Deployment.Type.DEDICATED:
        if catalog_selectors.dedicated_price_at(version=version, profile=profile, at=now) is None:
            raise ValidationFailed(
                f"{label} has no dedicated price on {profile.name}, so it cannot be deployed "
                "there; choose another hardware profile.",
                field="hardware_profile",
            )
    elif catalog_selectors.token_price_at(version=version, at=now) is None:
        raise ValidationFailed(
            f"{label} has no per-token price, so it is not offered serverless.", field="type"
        )


def _validate_spec(
    *,
    organization,
    deployment_type: str,
    version,
    profile,
    min_replicas: int,
    max_replicas: int,
    target_in_flight_per_replica: int,
    scale_to_zero_after_seconds: int | None,
    exclude_id=None,
    check_quota: bool = True,
) -> None:
    """One validation of a deployment's spec for create, update and the platform's serverless
    pools: replica bounds, autoscaling, hardware fit, a price in force, the GPU quota."""
    _check_replicas(min_replicas=min_replicas, max_replicas=max_replicas)
    _check_autoscaling(target_in_flight_per_replica, scale_to_zero_after_seconds)
    _check_fit(version=version, profile=profile)
    _check_price(deployment_type=deployment_type, version=version, profile=profile)
    if check_quota:
        _check_gpu_quota(
            organization=organization,
            profile=profile,
            max_replicas=max_replicas,
            exclude_id=exclude_id,
        )


@transaction.atomic
def deployment_create(
    *,
    actor: Actor,
    name: str,
    model: str,
    version: str | None = None,
    type: str = Deployment.Type.DEDICATED,
    hardware_profile: str | None = None,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    target_in_flight_per_replica: int = 8,
    scale_to_zero_after_seconds: int | None = None,
    routing_policy: str = RoutingPolicy.PREFIX_AWARE,
    project: int | None = None,
    shared: bool = True,
    fallbacks: list[str] | None = None,
) -> Deployment:
    """Ask for a deployment. Checks name, model, profile fit, price and quotas; the reconciler
    makes it real after the transaction commits. It belongs to `project` (an id; default: the
    organization's default project) and, when `shared`, every project may call it. `fallbacks`
    names other deployments of the organization to try, in order, when this one's upstream
    fails before the first byte."""
    from accounts import projects

    organization = actor.organization
    if project is None:
        require(actor, Permission.DEPLOYMENTS_WRITE)
        owner = projects.project_default(organization=organization)
    else:
        owner = projects.project_named_in_input(organization=organization, project_id=project)
        projects.require_in_project(actor, owner, Permission.DEPLOYMENTS_WRITE)
    _check_name(organization, name)
    model_version = _resolve_version(organization=organization, model=model, version=version)
    if type not in Deployment.Type.values:
        raise ValidationFailed(
            f"Unknown type {type!r}. Use {' or '.join(Deployment.Type.values)}.", field="type"
        )
    _check_deployment_quota(organization)
    _check_routing_policy(routing_policy)

    if model_version.is_partner:
        deployment = _partner_entry(
            actor=actor, name=name, model_version=model_version, type=type, profile=hardware_profile
        )
    elif type == Deployment.Type.SERVERLESS:
        _require_terms_accepted(actor=actor, model_version=model_version)
        if hardware_profile:
            raise ValidationFailed(
                "Serverless deployments run on the platform's shared pool: leave out "
                "hardware_profile.",
                field="hardware_profile",
            )
        pool = pool_for(model_version=model_version)
        if pool is None:
            raise ValidationFailed(
                f"{model} {model_version.version} is not offered serverless; deploy it "
                "dedicated on a hardware profile instead.",
                field="type",
            )
        _check_price(deployment_type=type, version=model_version, profile=None)
        deployment = Deployment(
            organization=organization,
            project=owner,
            shared=shared,
            name=name,
            model_version=model_version,
            type=type,
            pool=pool,
            serving_runtime=model_version.serving_runtime,
            min_replicas=0,
            max_replicas=1,
            desired_replicas=0,
        )
    else:
        if not hardware_profile:
            raise ValidationFailed(
                "A dedicated deployment needs a hardware_profile (GET /api/v1/hardware-profiles).",
                field="hardware_profile",
            )
        _require_terms_accepted(actor=actor, model_version=model_version)
        max_replicas = max_replicas if max_replicas is not None else max(1, min_replicas)
        _check_replicas(min_replicas=min_replicas, max_replicas=max_replicas)
        profile = _resolve_profile(hardware_profile)
        _validate_spec(
            organization=organization,
            deployment_type=type,
            version=model_version,
            profile=profile,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_in_flight_per_replica=target_in_flight_per_replica,
            scale_to_zero_after_seconds=scale_to_zero_after_seconds,
        )
        deployment = Deployment(
            organization=organization,
            project=owner,
            shared=shared,
            name=name,
            model_version=model_version,
            type=type,
            hardware_profile=profile,
            serving_runtime=model_version.serving_runtime,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            desired_replicas=max(min_replicas, 1) if max_replicas else 0,
            target_in_flight_per_replica=target_in_flight_per_replica,
            scale_to_zero_after_seconds=scale_to_zero_after_seconds,
            routing_policy=routing_policy,
        )
    try:
        with transaction.atomic():
            deployment.save()
    except IntegrityError:  # a concurrent create took the name between the check and here
        raise Conflict(
            f"Your organization already has a deployment named {name!r}; choose another name.",
            field="name",
            code="name_taken",
        ) from None
    transitions.created(deployment, message=f"{actor.label} asked for {_describe(deployment)}.")
    changes = {
        "model": model,
        "version": model_version.version,
        "type": type,
        "project": owner.name,
        "shared": shared,
        "hardware_profile": hardware_profile,
        "min_replicas": deployment.min_replicas,
        "max_replicas": deployment.max_replicas,
    }
    if fallbacks:
        changes["fallbacks"] = _set_fallbacks(deployment, fallbacks)
    audit_record(actor=actor, action="deployment.create", target=deployment, changes=changes)
    return deployment


def fallback_names(deployment: Deployment) -> list[str]:
    """The names of a deployment's fallback targets, in order."""
    return list(
        Fallback.objects.filter(deployment=deployment)
        .order_by("position")
        .values_list("target__name", flat=True)
    )


def _set_fallbacks(deployment: Deployment, names) -> list[str]:
    """Replace a deployment's fallback targets with the organization's deployments `names`,
    in order. A name is looked up in the deployment's own organization only, so another
    organization's deployment is "unknown" exactly like a name nobody has (nothing leaks).
    Refused: itself, twice the same, more than DEPLOYMENTS_MAX_FALLBACKS, a target being
    deleted or failed, and a cycle (a target whose own fallbacks lead back here)."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValidationFailed("fallbacks must be a list of deployment names.", field="fallbacks")
    limit = settings.DEPLOYMENTS_MAX_FALLBACKS
    if len(names) > limit:
        raise ValidationFailed(
            f"A deployment may name at most {limit} fallbacks ({len(names)} given).",
            field="fallbacks",
        )
    if len(set(names)) != len(names):
        raise ValidationFailed("fallbacks names a deployment twice.", field="fallbacks")
    targets = []
    for name in names:
        if name == deployment.name:
            raise ValidationFailed(
                f"{name} cannot be its own fallback.", field="fallbacks", code="fallback_cycle"
            )
        target = (
            Deployment.objects.filter(organization_id=deployment.organization_id, name=name)
            .exclude(status=Deployment.Status.DELETED)
            .first()
        )
        if target is None:
            raise ValidationFailed(
                f"Your organization has no deployment named {name!r} (a fallback is another "
                "of your deployments, or a partner model you enabled).",
                field="fallbacks",
                code="unknown_fallback",
            )
        if target.status in (
            Deployment.Status.DELETING,
            Deployment.Status.DELETED,
            Deployment.Status.FAILED,
        ):
            raise ValidationFailed(
                f"{name} is {target.status}: it cannot serve as a fallback.",
                field="fallbacks",
                code="fallback_not_enabled",
            )
        targets.append(target)
    _check_no_cycle(deployment, targets)
    Fallback.objects.filter(deployment=deployment).delete()
    Fallback.objects.bulk_create(
        Fallback(deployment=deployment, target=target, position=position)
        for position, target in enumerate(targets)
    )
    return [target.name for target in targets]


def _check_no_cycle(deployment: Deployment, targets: list[Deployment]) -> None:
    """No target reaches `deployment` through fallbacks (walked breadth-first over the
    organization's fallback rows, which are few)."""
    edges: dict = {}
    for source, target in Fallback.objects.filter(
        deployment__organization_id=deployment.organization_id
    ).values_list("deployment_id", "target_id"):
        edges.setdefault(source, []).append(target)
    edges[deployment.pk] = [target.pk for target in targets]
    seen, frontier = set(), list(edges[deployment.pk])
    while frontier:
        current = frontier.pop()
        if current == deployment.pk:
            raise ValidationFailed(
                f"These fallbacks make a cycle: one of them falls back (directly or not) to "
                f"{deployment.name}.",
                field="fallbacks",
                code="fallback_cycle",
            )
        if current not in seen:
            seen.add(current)
            frontier.extend(edges.get(current, ()))


def _partner_entry(*, actor: Actor, name: str, model_version, type: str, profile) -> Deployment:
    """An organization's entry to a partner-hosted model: serverless, no pool, no replicas.
    Its terms of use in force must have been accepted for the organization first."""
    label = f"{model_version.model.slug} {model_version.version}"
    if type != Deployment.Type.SERVERLESS or profile:
        raise ValidationFailed(
            f"{label} is hosted by {model_version.model.publisher}: it is offered serverless "
            'only (type "serverless", no hardware_profile).',
            field="type" if type != Deployment.Type.SERVERLESS else "hardware_profile",
        )
    _check_price(deployment_type=type, version=model_version, profile=None)
    _require_terms_accepted(actor=actor, model_version=model_version)
    return Deployment(
        organization=actor.organization,
        name=name,
        model_version=model_version,
        type=Deployment.Type.SERVERLESS,
        min_replicas=0,
        max_replicas=1,
        desired_replicas=0,
    )


def _require_terms_accepted(*, actor: Actor, model_version) -> None:
    """The organization accepted the version's terms of use in force (a partner's or a
    publisher's model, self-hosted or not); a version without terms needs nothing."""
    from catalog.terms import terms_accepted, terms_in_force

    if terms_accepted(organization_id=actor.organization.pk, version_id=model_version.pk):
        return
    terms = terms_in_force(version_id=model_version.pk)
    label = f"{model_version.model.slug} {model_version.version}"
    raise PermissionDenied(
        f'Accept the terms of use of {label} (version {terms.version}, "{terms.title}") '
        f"for your organization first: POST /api/v1/models/{model_version.model.slug}/"
        f'versions/{model_version.version}/terms/accept with {{"version": '
        f'"{terms.version}"}}.',
        field="model",
        code="terms_not_accepted",
    )


def _check_autoscaling(target: int, scale_to_zero_after_seconds: int | None) -> None:
    if target < 1:
        raise ValidationFailed(
            "target_in_flight_per_replica must be at least 1.",
            field="target_in_flight_per_replica",
        )
    if scale_to_zero_after_seconds is not None and scale_to_zero_after_seconds < 60:
        raise ValidationFailed(
            "scale_to_zero_after_seconds must be at least 60 (or empty for never).",
            field="scale_to_zero_after_seconds",
        )


def _describe(deployment: Deployment) -> str:
    version = deployment.model_version
    if deployment.is_partner_entry:
        return f"{version.model.slug} {version.version} serverless, hosted by {version.model.publisher}"
    if deployment.pool_id:
        return f"{version.model.slug} {version.version} serverless"
    profile = deployment.hardware_profile.name if deployment.hardware_profile_id else "-"
    return (
        f"{version.model.slug} {version.version} on {profile}, "
        f"{deployment.min_replicas}-{deployment.max_replicas} replicas"
    )


UPDATABLE_FIELDS = {
    "fallbacks",
    "routing_policy",
    "version",
    "hardware_profile",
    "min_replicas",
    "max_replicas",
    "target_in_flight_per_replica",
    "scale_to_zero_after_seconds",
}


@transaction.atomic
def deployment_update(*, actor: Actor, deployment: Deployment, **fields) -> Deployment:
    """Change a deployment: scale bounds and autoscaling (a scale), or the model version or
    hardware profile (a rolling update: new replicas become ready before old ones stop)."""
    require(actor, Permission.DEPLOYMENTS_WRITE)
    unknown = sorted(set(fields) - UPDATABLE_FIELDS)
    if unknown:
        raise ValidationFailed(f"{unknown[0]} cannot be changed.", field=unknown[0])
    deployment = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("model_version__model", "hardware_profile", "serving_runtime")
        .get(pk=deployment.pk)
    )
    if deployment.organization_id != actor.organization.pk:
        raise NotFound("No such deployment in your organization.")
    if deployment.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
        raise Conflict("This deployment is being deleted; it cannot be changed.")
    changes: dict = {}
    if "fallbacks" in fields:  # any deployment, a partner entry or a serverless one included
        before = fallback_names(deployment)
        after = _set_fallbacks(deployment, fields.pop("fallbacks"))
        if after != before:
            changes["fallbacks"] = [before, after]
    if deployment.is_partner_entry and fields:
        raise ValidationFailed(
            f"{deployment.model_version.model.slug} is served by its provider: there is nothing "
            "to scale or update. Delete it and enable the version you want.",
            field=sorted(fields)[0],
        )
    if deployment.pool_id and fields:
        raise ValidationFailed(
            "A serverless deployment runs on the shared pool: there is nothing to scale or "
            "update. Delete it and deploy the version you want.",
            field=sorted(fields)[0],
        )

    rollout = False
    if "version" in fields and fields["version"] != deployment.model_version.version:
        new_version = _resolve_version(
            organization=deployment.organization,
            model=deployment.model_version.model.slug,
            version=fields["version"],
        )
        changes["version"] = [deployment.model_version.version, new_version.version]
        deployment.model_version = new_version
        deployment.serving_runtime = new_version.serving_runtime
        rollout = True
    if "hardware_profile" in fields and fields["hardware_profile"] != (
        deployment.hardware_profile.name
    ):
        profile = _resolve_profile(fields["hardware_profile"])
        changes["hardware_profile"] = [deployment.hardware_profile.name, profile.name]
        deployment.hardware_profile = profile
        rollout = True
    if "routing_policy" in fields:
        _check_routing_policy(fields["routing_policy"])
    for name in ("min_replicas", "max_replicas", "target_in_flight_per_replica", "routing_policy"):
        if name in fields and fields[name] != getattr(deployment, name):
            changes[name] = [getattr(deployment, name), fields[name]]
            setattr(deployment, name, fields[name])
    if "scale_to_zero_after_seconds" in fields and (
        fields["scale_to_zero_after_seconds"] != deployment.scale_to_zero_after_seconds
    ):
        changes["scale_to_zero_after_seconds"] = [
            deployment.scale_to_zero_after_seconds,
            fields["scale_to_zero_after_seconds"],
        ]
        deployment.scale_to_zero_after_seconds = fields["scale_to_zero_after_seconds"]
    if not changes:
        return deployment
    if set(changes) == {"fallbacks"}:  # the gateway reads them with the route: no new spec
        before, after = changes["fallbacks"]
        transitions.event_record(
            deployment,
            "FallbacksChanged",
            f"{actor.label} set the fallbacks to {', '.join(after) or 'none'} "
            f"(were {', '.join(before) or 'none'}).",
        )
        audit_record(actor=actor, action="deployment.update", target=deployment, changes=changes)
        return deployment

    # A rollout is checked whole (fit and price on the new version or profile); a scale only
    # for what it changes (bounds, autoscaling, quota): a price withdrawn later does not stop
    # a customer from scaling down.
    if rollout:
        _validate_spec(
            organization=deployment.organization,
            deployment_type=deployment.type,
            version=deployment.model_version,
            profile=deployment.hardware_profile,
            min_replicas=deployment.min_replicas,
            max_replicas=deployment.max_replicas,
            target_in_flight_per_replica=deployment.target_in_flight_per_replica,
            scale_to_zero_after_seconds=deployment.scale_to_zero_after_seconds,
            exclude_id=deployment.pk,
        )
    else:
        _check_replicas(min_replicas=deployment.min_replicas, max_replicas=deployment.max_replicas)
        _check_autoscaling(
            deployment.target_in_flight_per_replica, deployment.scale_to_zero_after_seconds
        )
        _check_gpu_quota(
            organization=deployment.organization,
            profile=deployment.hardware_profile,
            max_replicas=deployment.max_replicas,
            exclude_id=deployment.pk,
        )
    desired = min(
        max(deployment.desired_replicas, deployment.min_replicas), deployment.max_replicas
    )
    replicas_changed = desired != deployment.desired_replicas
    deployment.desired_replicas = desired
    retry = deployment.status == Deployment.Status.FAILED
    summary = ", ".join(f"{name} {old} → {new}" for name, (old, new) in changes.items())
    transitions.updated(
        deployment,
        new_generation=rollout or replicas_changed or retry,
        rollout=rollout,
        message=f"{actor.label} changed {summary}.",
    )
    audit_record(actor=actor, action="deployment.update", target=deployment, changes=changes)
    return deployment


@transaction.atomic
def deployment_delete(*, actor: Actor, deployment: Deployment) -> Deployment:
    """Ask for a deployment's removal. The reconciler tears everything down, waits until the
    cluster has let go, then marks it deleted (its usage history stays for billing)."""
    require(actor, Permission.DEPLOYMENTS_WRITE)
    deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if deployment.organization_id != actor.organization.pk:
        raise NotFound("No such deployment in your organization.")
    if deployment.status in (Deployment.Status.DELETING, Deployment.Status.DELETED):
        return deployment
    members = deployment.members.exclude(status=Deployment.Status.DELETED)
    if members.exists():
        raise Conflict(
            f"{members.count()} serverless deployments still use this pool; they must be "
            "deleted first."
        )
    transitions.deleting(deployment, message=f"{actor.label} deleted it.")
    audit_record(actor=actor, action="deployment.delete", target=deployment)
    return deployment


def _check_routing_policy(policy: str) -> None:
    if policy not in RoutingPolicy.values:
        raise ValidationFailed(
            f"Unknown routing_policy {policy!r}. Use {' or '.join(RoutingPolicy.values)}.",
            field="routing_policy",
        )


def pool_name_for(version) -> str:
    """A DNS-safe deployment name for a model version's pool (dots and long slugs folded)."""
    name = re.sub(r"[^a-z0-9-]+", "-", version.model.slug.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"m-{name}"
    return name[:NAME_MAX_LENGTH].rstrip("-")


@transaction.atomic
def serverless_pool_ensure(
    *,
    model_version,
    hardware_profile,
    min_replicas: int = 1,
    max_replicas: int = 2,
    target_in_flight_per_replica: int = 8,
    scale_to_zero_after_seconds: int | None = None,
) -> Deployment:
    """The platform's shared serverless pool for a model version (created if missing; an
    existing one is left as the operator tuned it). Organizations' serverless deployments point
    at it. Operators call this from bootstrap_demo or the Django shell."""
    platform, _ = Organization.objects.get_or_create(
        slug=PLATFORM_ORGANIZATION_SLUG, defaults={"name": "Sirocco platform"}
    )
    existing = pool_for(model_version=model_version)
    if existing is not None:
        return existing
    _validate_spec(
        organization=platform,
        deployment_type=Deployment.Type.SERVERLESS,
        version=model_version,
        profile=hardware_profile,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_in_flight_per_replica=target_in_flight_per_replica,
        scale_to_zero_after_seconds=scale_to_zero_after_seconds,
        # The platform's own pool: its GPUs are the platform team's, not a customer's quota.
        check_quota=False,
    )
    pool = Deployment.objects.create(
        organization=platform,
        name=_free_name(platform, pool_name_for(model_version)),
        model_version=model_version,
        type=Deployment.Type.SERVERLESS,
        hardware_profile=hardware_profile,
        serving_runtime=model_version.serving_runtime,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        desired_replicas=max(min_replicas, 0),
        target_in_flight_per_replica=target_in_flight_per_replica,
        scale_to_zero_after_seconds=scale_to_zero_after_seconds,
    )
    transitions.created(
        pool, message=f"Shared serverless pool for {model_version}: {_describe(pool)}."
    )
    audit_record(
        actor=Actor.system(platform),
        action="deployment.create",
        target=pool,
        changes={"pool": True, "model_version": str(model_version)},
    )
    return pool


def _free_name(organization, base: str) -> str:
    taken = set(
        Deployment.objects.filter(organization=organization, name__startswith=base)
        .exclude(status=Deployment.Status.DELETED)
        .values_list("name", flat=True)
    )
    if base not in taken:
        return base
    for index in range(2, 1000):
        candidate = f"{base[: NAME_MAX_LENGTH - 4]}-{index}"
        if candidate not in taken:
            return candidate
    raise Conflict(f"No free deployment name left for {base}.")


def deployment_request_scale_up(*, deployment_id) -> None:
    """The gateway has a request for a deployment with no replicas: scale it (or its pool)
    from zero. Idempotent and cheap when already scaling: one read, no write."""
    deployment = Deployment.objects.filter(pk=deployment_id).only("pk", "pool_id", "status").first()
    if deployment is None:
        return
    transitions.scaled(
        deployment.pool_id or deployment.pk,
        replicas=1,
        reason="ScaledUpFromZero",
        message="A request arrived while no replica ran: starting one.",
        where=Q(
            desired_replicas=0,
            max_replicas__gt=0,
            status__in=(
                Deployment.Status.READY,
                Deployment.Status.SCALING,
                Deployment.Status.PROVISIONING,
                Deployment.Status.PENDING,
            ),
        ),
        requested=True,
    )


def replica_unhealthy_report(*, deployment_id, endpoint: str, why: str) -> None:
    """A gateway could not use a replica (it refused the connection, or reset it mid-answer):
    every gateway stops routing to it at once (it is no longer listed as ready), and the
    deployment gets a reconcile pass now, which restarts it, or lists it again if it answers.
    Cheap when repeated: one read and one conditional UPDATE."""
    serving = Deployment.objects.filter(pk=deployment_id).values_list("pool_id", flat=True).first()
    serving_id = serving or deployment_id
    with transaction.atomic():
        marked = Replica.objects.filter(
            deployment_id=serving_id, endpoint=endpoint, ready=True
        ).update(ready=False)
        # (Eager runs, the tests', drive their passes themselves: not from a gateway thread.)
        if marked and not settings.CELERY_TASK_ALWAYS_EAGER:
            from deployments.tasks import reconcile_deployment

            why = f"the gateway says the replica at {endpoint} {why}"[:500]
            transaction.on_commit(lambda: reconcile_deployment.delay(str(serving_id), why=why))


def upstream_circuit_report(
    *, deployment_id, upstream: str, source: str, state: str, failures: int, changed_at: datetime
) -> None:
    """A gateway process's circuit breaker for an upstream of this deployment changed state at
    `changed_at` (gateway/circuit.py): kept, one row per deployment, upstream and gateway
    process, for the deployment page. Reports run in the background and may land out of
    order: an older one never replaces a newer. An opened circuit is also an event in the
    deployment's history. A deployment gone meanwhile is ignored."""
    if state not in UpstreamCircuit.State.values:
        return
    if not Deployment.objects.filter(pk=deployment_id).exists():
        return
    upstream, source = upstream[:255], source[:200]
    with transaction.atomic():
        row = (
            UpstreamCircuit.objects.select_for_update()
            .filter(deployment_id=deployment_id, upstream=upstream, source=source)
            .first()
        )
        if row is not None and row.changed_at >= changed_at:
            return
        if row is None:
            row = UpstreamCircuit(deployment_id=deployment_id, upstream=upstream, source=source)
        row.state, row.failures, row.changed_at = state, failures, changed_at
        try:
            with transaction.atomic():
                row.save()
        except IntegrityError:  # another report of the same process made the row first
            UpstreamCircuit.objects.filter(
                deployment_id=deployment_id,
                upstream=upstream,
                source=source,
                changed_at__lt=changed_at,
            ).update(state=state, failures=failures, changed_at=changed_at)
        if state == UpstreamCircuit.State.OPEN:
            transitions.event_record(
                str(deployment_id),
                "CircuitOpened",
                f"A gateway stopped sending requests to {_upstream_label(upstream)} after "
                f"{failures} failures in a row; it tries again after a cool-down.",
                warning=True,
            )


def _upstream_label(upstream: str) -> str:
    """An upstream as its tenant may read it: endpoints and connection names are the
    platform's business (see deployments.serializers.ReplicaSerializer)."""
    if upstream.startswith("provider:"):
        return "the model's provider"
    name = Replica.objects.filter(endpoint=upstream).values_list("name", flat=True).first()
    return f"replica {name}" if name else "a replica"


def load_report(
    *,
    deployment_id,
    source: str,
    in_flight: float,
    requests: int,
    last_request_at: datetime | None,
) -> None:
    """Record a gateway process's view of a deployment's load (one row per deployment and
    source). The row keeps an exponential moving average the autoscaler divides by the target."""
    now = timezone.now()
    in_flight = max(0.0, float(in_flight))
    tau = settings.DEPLOYMENTS_LOAD_AVERAGE_SECONDS
    with transaction.atomic():
        report = (
            LoadReport.objects.select_for_update()
            .filter(deployment_id=deployment_id, source=source)
            .first()
        )
        if report is None:
            try:
                with transaction.atomic():
                    LoadReport.objects.create(
                        deployment_id=deployment_id,
                        source=source,
                        in_flight=in_flight,
                        in_flight_average=in_flight,
                        requests=max(0, requests),
                        last_request_at=last_request_at,
                        reported_at=now,
                    )
                return
            except IntegrityError:  # a report from the same source raced us, or no deployment
                report = (
                    LoadReport.objects.select_for_update()
                    .filter(deployment_id=deployment_id, source=source)
                    .first()
                )
                if report is None:
                    return
        elapsed = max(0.0, (now - report.reported_at).total_seconds())
        weight = 1.0 - math.exp(-elapsed / tau) if tau > 0 else 1.0
        report.in_flight_average += weight * (in_flight - report.in_flight_average)
        report.in_flight = in_flight
        report.requests = max(0, requests)
        if last_request_at is not None and (
            report.last_request_at is None or last_request_at > report.last_request_at
        ):
            report.last_request_at = last_request_at
        report.reported_at = now
        report.save()
