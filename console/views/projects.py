"""Projects: the list, and one project's page (settings and allow-list, budget, members, keys).

Each form posts to its own view, which calls one service (accounts.projects, or
accounts.services.api_key_create) and comes back to the project's page; what a project role
allows is the services' to decide, so these views ask only for organization.read and show a
refused write as the forbidden page, like any other.
"""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect
from django.utils.cache import add_never_cache_headers

from accounts import projects, services
from accounts.roles import Permission, Role
from billing import selectors as billing_selectors
from console.project_forms import ProjectBudgetForm, ProjectForm, ProjectKeyForm, ProjectMemberForm
from console.views.base import ConsoleView, apply_domain_error
from console.views.keys import NEW_SECRET_SESSION_KEY
from controlplane.errors import DomainError
from controlplane.errors import PermissionDenied as DomainPermissionDenied
from deployments.selectors import deployment_list


class ProjectListView(ConsoleView):
    """The organization's projects, and the form that makes one."""

    section = "projects"
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "POST": Permission.ORGANIZATION_READ,
    }

    def get(self, request):
        return self.show(ProjectForm())

    def post(self, request):
        form = ProjectForm(request.POST)
        if form.is_valid():
            try:
                project = projects.project_create(actor=request.actor, **form.cleaned_data)
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(request, f"Created the project {project.name}.")
                return redirect("console:project", project_id=project.pk)
        return self.show(form, status=400)

    def show(self, form, *, status=200):
        organization = self.request.actor.organization
        rows = [
            (project, billing_selectors.project_period_spend(project=project))
            for project in projects.project_list(organization=organization)
        ]
        return self.render(
            "console/projects/list.html", {"form": form, "rows": rows}, status=status
        )


class ProjectView(ConsoleView):
    """One project: settings and allow-list, budget, members and keys, each form its own POST."""

    section = "projects"
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "POST": Permission.ORGANIZATION_READ,
    }

    def project(self, project_id):
        return projects.project_get(
            organization=self.request.actor.organization, project_id=project_id
        )

    def get(self, request, project_id):
        project = self.project(project_id)
        created = request.session.pop(NEW_SECRET_SESSION_KEY, None)
        if created and created.get("project_id") != project.pk:
            created = None
        response = self.show(project, created=created)
        if created:
            add_never_cache_headers(response)
        return response

    def show(self, project, *, status=200, created=None, **forms):
        actor = self.request.actor
        can = {
            name: projects.project_can(actor=actor, project=project, permission=permission)
            for name, permission in (
                ("edit", Permission.ORGANIZATION_WRITE),
                ("budget", Permission.BILLING_WRITE),
                ("members", Permission.MEMBERS_WRITE),
                ("keys_read", Permission.API_KEYS_READ),
                ("keys_write", Permission.API_KEYS_WRITE),
            )
        }
        context = {
            "project": project,
            "project_can": can,
            "settings_form": ProjectForm(
                initial={
                    "name": project.name,
                    "description": project.description,
                    "rpm_limit": project.rpm_limit,
                    "tpm_limit": project.tpm_limit,
                    "allowed_models": "\n".join(project.allowed_models),
                }
            ),
            "budget_form": ProjectBudgetForm(initial={"monthly_budget": project.monthly_budget}),
            "member_form": ProjectMemberForm(),
            "key_form": ProjectKeyForm(),
            "budget": billing_selectors.project_budget(project=project),
            "members": projects.project_member_list(project=project),
            "keys": projects.project_api_key_list(project=project) if can["keys_read"] else [],
            "deployments": deployment_list(organization=actor.organization)
            .exclude(status="deleted")
            .filter(project=project),
            "deployment_names": sorted(
                deployment_list(organization=actor.organization)
                .exclude(status="deleted")
                .values_list("name", flat=True)
            ),
            "roles": Role.choices,
            "created": created,
            **forms,
        }
        return self.render("console/projects/detail.html", context, status=status)

    def save(self, project, form, form_name: str, write, success: str):
        """Validate `form`, call `write(cleaned_data)` (a service), come back to the page."""
        if form.is_valid():
            try:
                write(form.cleaned_data)
            except DomainPermissionDenied:
                raise  # the forbidden page, as for any page the role may not use
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(self.request, success)
                return redirect("console:project", project_id=project.pk)
        return self.show(project, status=400, **{form_name: form})


class ProjectSettingsView(ProjectView):
    def post(self, request, project_id):
        project = self.project(project_id)
        return self.save(
            project,
            ProjectForm(request.POST),
            "settings_form",
            lambda data: projects.project_update(actor=request.actor, project=project, **data),
            "Saved the project's settings and allow-list.",
        )


class ProjectBudgetView(ProjectView):
    def post(self, request, project_id):
        project = self.project(project_id)
        return self.save(
            project,
            ProjectBudgetForm(request.POST),
            "budget_form",
            lambda data: projects.project_update(actor=request.actor, project=project, **data),
            "Saved the project's monthly budget.",
        )


class ProjectMemberAddView(ProjectView):
    def post(self, request, project_id):
        project = self.project(project_id)
        return self.save(
            project,
            ProjectMemberForm(request.POST),
            "member_form",
            lambda data: projects.project_member_add(actor=request.actor, project=project, **data),
            f"Added {request.POST.get('email', '').strip().lower()} to the project.",
        )


class ProjectMemberChangeView(ProjectView):
    """The role picker and the remove button on each member's row."""

    def post(self, request, project_id, pk):
        project = self.project(project_id)
        member = get_object_or_404(projects.project_member_list(project=project), pk=pk)
        try:
            if request.POST.get("remove"):
                projects.project_member_remove(actor=request.actor, member=member)
                messages.success(request, f"Removed {member.user.email} from the project.")
            else:
                role = request.POST.get("role", "")
                projects.project_member_update(actor=request.actor, member=member, role=role)
                messages.success(request, f"{member.user.email} is now {Role(role).label} here.")
        except DomainError as error:
            messages.error(request, error.message)
        return redirect("console:project", project_id=project.pk)


class ProjectKeyCreateView(ProjectView):
    def post(self, request, project_id):
        project = self.project(project_id)
        form = ProjectKeyForm(request.POST)
        if form.is_valid():
            try:
                key, secret = services.api_key_create(
                    actor=request.actor, project=project, **form.cleaned_data
                )
            except DomainPermissionDenied:
                raise
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                request.session[NEW_SECRET_SESSION_KEY] = {
                    "organization_id": key.organization_id,
                    "project_id": project.pk,
                    "name": key.name,
                    "secret": secret,
                }
                return redirect("console:project", project_id=project.pk)
        return self.show(project, status=400, key_form=form)
