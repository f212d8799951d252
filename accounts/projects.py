"""Projects inside an organization: services (writes, audited, with an actor) and selectors.

A person's power inside a project is what their organization role grants, plus what their
project role grants there (both from accounts.roles' one table): an organization viewer who
is a developer of project "search" may make keys for "search" and nothing else. Keys act with
the organization's rules as before; a project only narrows what they may call (allow-list)
and adds limits and a budget.
"""

import re
from decimal import Decimal

from django.db import transaction
from django.db.models import QuerySet

from accounts.actors import Actor
from accounts.models import APIKey, Membership, Project, ProjectMembership
from accounts.roles import ROLE_PERMISSIONS, Permission, Role, role_can_grant, role_has_permission
from accounts.services import _jsonable, audit_record
from controlplane.errors import Conflict, NotFound, PermissionDenied, ValidationFailed

# A model name as the gateway matches it: a deployment's name (DNS label) or a catalog
# model's name with its publisher ("org/model-name").
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")

PROJECT_FIELDS = {"name", "description", "rpm_limit", "tpm_limit", "allowed_models"}
BUDGET_FIELDS = {"monthly_budget"}


# ---- selectors -----------------------------------------------------------------------------


def project_list(*, organization) -> QuerySet[Project]:
    return Project.objects.filter(organization=organization)


def project_get(*, organization, project_id) -> Project:
    """The organization's project, or NotFound (another tenant's project is not found)."""
    project = project_list(organization=organization).filter(pk=project_id).first()
    if project is None:
        raise NotFound("No such project in your organization.")
    return project


def project_named_in_input(*, organization, project_id) -> Project:
    """A project a request body names: an unknown id (or another tenant's) is a field error."""
    project = project_list(organization=organization).filter(pk=project_id).first()
    if project is None:
        raise ValidationFailed(
            f"No project {project_id} in your organization (GET /api/v1/projects lists them).",
            field="project",
        )
    return project


def project_default(*, organization) -> Project:
    return Project.objects.get(organization=organization, is_default=True)


def project_member_list(*, project: Project) -> QuerySet[ProjectMembership]:
    return ProjectMembership.objects.filter(project=project).select_related("user")


def project_api_key_list(*, project: Project) -> QuerySet[APIKey]:
    return APIKey.objects.filter(project=project).select_related("created_by", "project")


def project_role(*, actor: Actor, project: Project) -> str | None:
    """The actor's own role in the project (a person's project membership), if any."""
    if actor.user is None:
        return None
    return (
        ProjectMembership.objects.filter(project=project, user=actor.user)
        .values_list("role", flat=True)
        .first()
    )


def project_can(*, actor: Actor, project: Project, permission: str) -> bool:
    if project.organization_id != actor.organization.pk:
        return False
    if actor.can(permission):
        return True
    role = project_role(actor=actor, project=project)
    return role is not None and role_has_permission(role, permission)


def require_in_project(actor: Actor, project: Project, permission: str) -> None:
    if not project_can(actor=actor, project=project, permission=permission):
        raise PermissionDenied(
            f"Your role may not do this in project {project.name!r} ({permission}). Ask an "
            "owner or admin of the organization, or of the project."
        )


def best_role(actor: Actor, project: Project) -> str:
    """The largest role the actor holds here (organization or project): what they may grant."""
    roles = [actor.role]
    own = project_role(actor=actor, project=project)
    if own is not None:
        roles.append(own)
    return max(roles, key=lambda role: len(ROLE_PERMISSIONS[role]))


# ---- validation ----------------------------------------------------------------------------


def clean_allowed_models(value, *, field: str = "allowed_models") -> list[str]:
    """A sorted, de-duplicated list of model names (empty: no restriction)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationFailed(f"{field} must be a list of model names.", field=field)
    names = sorted({item.strip() for item in value if item.strip()})
    if len(names) > Project.MAX_ALLOWED_MODELS:
        raise ValidationFailed(
            f"{field} may name at most {Project.MAX_ALLOWED_MODELS} models.", field=field
        )
    bad = [name for name in names if not _MODEL_NAME.match(name)]
    if bad:
        raise ValidationFailed(
            f"{bad[0]!r} is not a model name: use the `model` your requests send (a "
            "deployment's name).",
            field=field,
        )
    return names


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValidationFailed("Give the project a name, such as 'search'.", field="name")
    if len(name) > 100:
        raise ValidationFailed("A project name has at most 100 characters.", field="name")
    return name


def _check_limits(fields: dict) -> None:
    for name in ("rpm_limit", "tpm_limit"):
        value = fields.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValidationFailed(f"{name} must be a positive integer or null.", field=name)
    budget = fields.get("monthly_budget")
    if budget is not None and (not isinstance(budget, Decimal) or budget < 0):
        raise ValidationFailed(
            "monthly_budget must be an amount of at least 0.", field="monthly_budget"
        )


# ---- services ------------------------------------------------------------------------------


@transaction.atomic
def project_create(
    *,
    actor: Actor,
    name: str,
    description: str = "",
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    monthly_budget: Decimal | None = None,
    allowed_models: list[str] | None = None,
) -> Project:
    """A new project. Needs organization.write; a budget also needs billing.write."""
    from accounts.services import require

    require(actor, Permission.ORGANIZATION_WRITE)
    if monthly_budget is not None:
        require(actor, Permission.BILLING_WRITE)
    name = _clean_name(name)
    fields = {"rpm_limit": rpm_limit, "tpm_limit": tpm_limit, "monthly_budget": monthly_budget}
    _check_limits(fields)
    if Project.objects.filter(organization=actor.organization, name=name).exists():
        raise Conflict(f"The project name {name!r} is taken; choose another.", field="name")
    project = Project.objects.create(
        organization=actor.organization,
        name=name,
        description=(description or "").strip()[:300],
        allowed_models=clean_allowed_models(allowed_models),
        **fields,
    )
    audit_record(
        actor=actor,
        action="project.create",
        target=project,
        changes={
            "name": name,
            "rpm_limit": rpm_limit,
            "tpm_limit": tpm_limit,
            "monthly_budget": _jsonable(monthly_budget),
            "allowed_models": project.allowed_models,
        },
    )
    return project


@transaction.atomic
def project_update(*, actor: Actor, project: Project, **fields) -> Project:
    """Change a project: its profile, limits and allow-list need organization.write (or that
    permission in the project); its budget billing.write, like the organization's limit."""
    unknown = set(fields) - PROJECT_FIELDS - BUDGET_FIELDS
    if unknown:
        raise ValidationFailed(
            f"{sorted(unknown)[0]} cannot be changed here.", field=sorted(unknown)[0]
        )
    if set(fields) & PROJECT_FIELDS:
        require_in_project(actor, project, Permission.ORGANIZATION_WRITE)
    if set(fields) & BUDGET_FIELDS:
        require_in_project(actor, project, Permission.BILLING_WRITE)
    _check_limits(fields)
    if "name" in fields:
        fields["name"] = _clean_name(fields["name"])
        taken = Project.objects.filter(organization_id=project.organization_id, name=fields["name"])
        if taken.exclude(pk=project.pk).exists():
            raise Conflict(f"The project name {fields['name']!r} is taken.", field="name")
    if "allowed_models" in fields:
        fields["allowed_models"] = clean_allowed_models(fields["allowed_models"])
    if "description" in fields:
        fields["description"] = (fields["description"] or "").strip()[:300]
    project = Project.objects.select_for_update().get(pk=project.pk)
    changes = {}
    for name, value in fields.items():
        old = getattr(project, name)
        if old != value:
            changes[name] = [_jsonable(old), _jsonable(value)]
            setattr(project, name, value)
    if changes:
        project.full_clean()
        project.save()
        audit_record(actor=actor, action="project.update", target=project, changes=changes)
    return project


@transaction.atomic
def project_delete(*, actor: Actor, project: Project) -> None:
    """Delete a project with no live keys and no deployments that still exist. Its revoked
    keys and torn-down deployments move to the default project (their history stays)."""
    from accounts.services import require

    require(actor, Permission.ORGANIZATION_WRITE)
    project = Project.objects.select_for_update().get(pk=project.pk)
    if project.is_default:
        raise Conflict("The default project cannot be deleted.")
    if project.api_keys.filter(revoked_at__isnull=True).exists():
        raise Conflict("The project still has live API keys: revoke them first.")
    if project.deployments.exclude(status="deleted").exists():
        raise Conflict("The project still has deployments: delete them first.")
    default = project_default(organization=actor.organization)
    moved_keys = project.api_keys.update(project=default)
    moved_deployments = project.deployments.update(project=default)
    audit_record(
        actor=actor,
        action="project.delete",
        target=project,
        changes={"moved_keys": moved_keys, "moved_deployments": moved_deployments},
    )
    project.delete()


def _check_grant(granter: str, role: str) -> None:
    if role not in Role.values:
        raise ValidationFailed(
            f"Unknown role {role!r}. Use one of: {', '.join(Role.values)}.", field="role"
        )
    if not role_can_grant(granter, role):
        raise PermissionDenied(f"Your role {granter!r} cannot grant or change the role {role!r}.")


@transaction.atomic
def project_member_add(
    *, actor: Actor, project: Project, email: str, role: str
) -> ProjectMembership:
    """Give a member of the organization a role in the project."""
    require_in_project(actor, project, Permission.MEMBERS_WRITE)
    _check_grant(best_role(actor, project), role)
    email = (email or "").strip().lower()
    membership = (
        Membership.objects.filter(organization_id=project.organization_id, user__email=email)
        .select_related("user")
        .first()
    )
    if membership is None:
        raise ValidationFailed(
            f"{email} is not a member of the organization; add them to it first.", field="email"
        )
    if ProjectMembership.objects.filter(project=project, user=membership.user).exists():
        raise Conflict(
            f"{email} is already in this project; change their role instead.", field="email"
        )
    member = ProjectMembership.objects.create(project=project, user=membership.user, role=role)
    audit_record(
        actor=actor,
        action="project_member.add",
        target=member,
        changes={"project": project.name, "email": email, "role": role},
    )
    return member


@transaction.atomic
def project_member_update(
    *, actor: Actor, member: ProjectMembership, role: str
) -> ProjectMembership:
    project = member.project
    require_in_project(actor, project, Permission.MEMBERS_WRITE)
    granter = best_role(actor, project)
    _check_grant(granter, role)
    _check_grant(granter, member.role)
    old = member.role
    member.role = role
    member.save(update_fields=["role"])
    audit_record(
        actor=actor, action="project_member.update", target=member, changes={"role": [old, role]}
    )
    return member


@transaction.atomic
def project_member_remove(*, actor: Actor, member: ProjectMembership) -> None:
    project = member.project
    require_in_project(actor, project, Permission.MEMBERS_WRITE)
    _check_grant(best_role(actor, project), member.role)
    audit_record(
        actor=actor,
        action="project_member.remove",
        target=member,
        changes={"project": project.name, "email": member.user.email},
    )
    member.delete()


def project_memberships_drop(*, organization_id: int, user_id: int) -> int:
    """A person left the organization: their project roles there go too."""
    deleted, _ = ProjectMembership.objects.filter(
        project__organization_id=organization_id, user_id=user_id
    ).delete()
    return deleted


@transaction.atomic
def api_key_update(*, actor: Actor, api_key: APIKey, **fields) -> APIKey:
    """Change a key's name or allow-list (its secret, scopes and role never change)."""
    unknown = set(fields) - {"name", "allowed_models"}
    if unknown:
        raise ValidationFailed(
            f"{sorted(unknown)[0]} cannot be changed on a key.", field=sorted(unknown)[0]
        )
    # Only the key's row is locked (its project may be missing: an outer join).
    key = (
        APIKey.objects.select_for_update(of=("self",))
        .select_related("project")
        .filter(pk=api_key.pk)
        .first()
    )
    if key is None or key.organization_id != actor.organization.pk:
        raise NotFound("No such API key in your organization.")
    require_in_project(actor, key.project, Permission.API_KEYS_WRITE)
    if "allowed_models" in fields:
        fields["allowed_models"] = clean_allowed_models(fields["allowed_models"])
    if "name" in fields:
        fields["name"] = (fields["name"] or "").strip()
        if not fields["name"]:
            raise ValidationFailed("Give the key a name.", field="name")
    changes = {}
    for name, value in fields.items():
        old = getattr(key, name)
        if old != value:
            changes[name] = [old, value]
            setattr(key, name, value)
    if changes:
        key.save(update_fields=list(changes))
        audit_record(actor=actor, action="api_key.update", target=key, changes=changes)
    return key
