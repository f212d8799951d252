from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect
from django.utils import timezone

from accounts.roles import Permission
from catalog import selectors as catalog_selectors
from console import estimates
from console.forms import DeployForm, FallbacksForm, ScaleForm
from console.views.base import ConsoleView, apply_domain_error
from console.views.catalog import hardware_options, token_price
from controlplane.errors import DomainError
from deployments import selectors, services
from deployments.filters import DeploymentFilter
from deployments.models import Deployment
from deployments.serializers import circuit_label

# While a deployment moves, its page asks for news every 2 s; once it settles, every 15 s.
TRANSITIONAL = {
    Deployment.Status.PENDING,
    Deployment.Status.PROVISIONING,
    Deployment.Status.SCALING,
    Deployment.Status.UPDATING,
    Deployment.Status.DELETING,
}
FAST_POLL, SLOW_POLL = "2s", "15s"
EVENTS_SHOWN = 20


def poll_interval(deployments) -> str | None:
    """How often a page showing `deployments` refreshes; None when nothing can change."""
    statuses = {d.status for d in deployments}
    if statuses & TRANSITIONAL:
        return FAST_POLL
    if statuses - {Deployment.Status.DELETED}:
        return SLOW_POLL
    return None


def gateway_base_url() -> str:
    return f"{settings.SIROCCO_PUBLIC_URL.rstrip('/')}/v1"


class OneStatusSelect(forms.Select):
    """One status from a select box, for the API's filter that takes several (`?status=a&status=b`
    still works)."""

    def value_from_datadict(self, data, files, name):
        return [value for value in data.getlist(name) if value]

    def format_value(self, value):
        return value or [""]


class DeploymentMixin:
    section = "deployments"
    list_url_name = "console:deployments"

    def get_deployment(self, deployment_id) -> Deployment:
        deployment = selectors.deployment_get(
            organization=self.request.actor.organization, deployment_id=deployment_id
        )
        if deployment is None:
            raise Http404("No such deployment in your organization.")
        return deployment


class DeploymentListView(DeploymentMixin, ConsoleView):
    required_permissions = {"GET": Permission.DEPLOYMENTS_READ}
    page_size = 50

    def get(self, request):
        deployments = selectors.deployment_list(organization=request.actor.organization)
        if not request.GET.get("status"):  # as the API: deleted ones only when asked for
            deployments = deployments.exclude(status=Deployment.Status.DELETED)
        filterset = DeploymentFilter(request.GET, queryset=deployments.order_by("-created_at"))
        filterset.form.fields["status"].widget = OneStatusSelect(
            choices=[("", "Any status but deleted"), *Deployment.Status.choices]
        )
        filterset.form.fields["type"].empty_label = "Any type"
        valid = filterset.is_valid()
        results = filterset.qs if valid else deployments.none()
        page = Paginator(results, self.page_size).get_page(request.GET.get("page"))
        query = request.GET.copy()
        query.pop("page", None)
        template = (
            "console/deployments/_list_table.html"
            if request.htmx
            else "console/deployments/list.html"
        )
        return self.render(
            template,
            {
                "page": page,
                "poll": poll_interval(page),
                "form": filterset.form,
                "query": query.urlencode(),
            },
            status=200 if valid else 400,
        )


class DeploymentDetailView(DeploymentMixin, ConsoleView):
    required_permissions = {"GET": Permission.DEPLOYMENTS_READ}

    def get(self, request, deployment_id):
        return self.show(self.get_deployment(deployment_id))

    def show(self, deployment, *, scale_form=None, fallbacks_form=None, status=200):
        events = list(selectors.deployment_events(deployment=deployment)[:EVENTS_SHOWN])
        replicas = selectors.serving_replicas(deployment)
        fallbacks = list(deployment.fallbacks.all())
        names = {replica.endpoint: replica.name for replica in replicas}
        context = {
            "fallbacks": fallbacks,
            "circuits": [
                (circuit_label(circuit, names), circuit) for circuit in deployment.circuits.all()
            ],
            "fallbacks_form": fallbacks_form
            or FallbacksForm(initial={"fallbacks": ", ".join(f.target.name for f in fallbacks)}),
            "deployment": deployment,
            "replicas": replicas,
            "events": events,
            "poll": poll_interval([deployment]),
            "base_url": gateway_base_url(),
            "scale_form": scale_form
            or ScaleForm(
                initial={
                    "min_replicas": deployment.min_replicas,
                    "max_replicas": deployment.max_replicas,
                }
            ),
        }
        # htmx polls for the live part alone; the full page the first time.
        template = (
            "console/deployments/_live.html"
            if self.request.htmx and self.request.GET.get("live")
            else "console/deployments/detail.html"
        )
        return self.render(template, context, status=status)


class DeploymentScaleView(DeploymentDetailView):
    required_permissions = {"POST": Permission.DEPLOYMENTS_WRITE}

    def post(self, request, deployment_id):
        deployment = self.get_deployment(deployment_id)
        form = ScaleForm(request.POST)
        if form.is_valid():
            try:
                services.deployment_update(
                    actor=request.actor, deployment=deployment, **form.cleaned_data
                )
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(request, f"Scaling {deployment.name}.")
                return redirect("console:deployment", deployment_id=deployment.pk)
        return self.show(deployment, scale_form=form, status=400)


class DeploymentFallbacksView(DeploymentDetailView):
    """Set a deployment's fallbacks (deployments.services.deployment_update, as PATCH does)."""

    required_permissions = {"POST": Permission.DEPLOYMENTS_WRITE}

    def post(self, request, deployment_id):
        deployment = self.get_deployment(deployment_id)
        form = FallbacksForm(request.POST)
        if form.is_valid():
            try:
                services.deployment_update(
                    actor=request.actor, deployment=deployment, fallbacks=form.names()
                )
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(request, f"Fallbacks of {deployment.name} saved.")
                return redirect("console:deployment", deployment_id=deployment.pk)
        return self.show(deployment, fallbacks_form=form, status=400)


class DeploymentDeleteView(DeploymentMixin, ConsoleView):
    required_permissions = {"POST": Permission.DEPLOYMENTS_WRITE}

    def post(self, request, deployment_id):
        deployment = self.get_deployment(deployment_id)
        try:
            services.deployment_delete(actor=request.actor, deployment=deployment)
        except DomainError as error:
            messages.error(request, error.message)
        else:
            messages.success(request, f"Deleting {deployment.name}: its replicas are stopping.")
        return redirect("console:deployment", deployment_id=deployment.pk)


class DeployView(ConsoleView):
    """The deploy form of one model: serverless or dedicated, profile, replicas, and what it
    would cost at the load you expect (refreshed as you type, by htmx)."""

    section = "models"
    list_url_name = "console:models"
    required_permissions = {
        "GET": Permission.DEPLOYMENTS_WRITE,
        "POST": Permission.DEPLOYMENTS_WRITE,
    }

    def setup_model(self, slug):
        organization = self.request.actor.organization
        self.model = catalog_selectors.model_by_slug(organization=organization, slug=slug)
        self.versions = [
            v
            for v in catalog_selectors.model_versions_for_detail(model=self.model)
            if v.status == v.Status.PUBLISHED
        ]
        if not self.versions:
            raise Http404("This model has no published version to deploy.")
        self.profiles = list(catalog_selectors.hardware_profile_list())

    def version_named(self, name):
        return next((v for v in self.versions if v.version == name), self.versions[0])

    def make_form(self, data=None, *, version):
        options = hardware_options(version, self.profiles)
        choices = [
            (
                option.profile.name,
                f"{option.profile.display_name} — {_money(option.per_hour, option.currency)}/h",
            )
            for option in options
            if option.deployable
        ]
        initial = {
            "name": default_deployment_name(self.request.actor.organization, self.model.slug),
            "version": version.version,
            "type": "dedicated" if choices else "serverless",
            "hardware_profile": choices[0][0] if choices else "",
        }
        form = DeployForm(
            data,
            initial=initial,
            versions=[v.version for v in self.versions],
            profiles=choices,
        )
        return form, options

    def get(self, request, slug):
        self.setup_model(slug)
        if self.model.is_partner:  # nothing to deploy: enabling is accepting its terms
            return redirect("console:enable", slug=slug)
        version = self.version_named(request.GET.get("version"))
        form, options = self.make_form(version=version)
        return self.show(form, version, options)

    def post(self, request, slug):
        self.setup_model(slug)
        version = self.version_named(request.POST.get("version"))
        form, options = self.make_form(request.POST, version=version)
        if form.is_valid():
            try:
                deployment = services.deployment_create(
                    actor=request.actor, model=self.model.slug, **form.service_arguments()
                )
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(request, f"Deploying {deployment.name}. This page follows it.")
                return redirect("console:deployment", deployment_id=deployment.pk)
        return self.show(form, version, options, status=400)

    def show(self, form, version, options, *, status=200):
        context = {
            "model": self.model,
            "version": version,
            "form": form,
            "options": options,
            "token_price": token_price(version),
            "serverless_offered": selectors.pool_for(model_version=version) is not None,
            **self.estimate_context(form, version, options),
        }
        return self.render("console/deployments/deploy.html", context, status=status)

    def estimate_context(self, form, version, options):
        data = form.cleaned_data if form.is_bound else {}
        chosen_profile = (
            data.get("hardware_profile") if form.is_bound else form.initial.get("hardware_profile")
        )
        option = next((o for o in options if o.profile.name == chosen_profile), None)
        replicas = data.get("min_replicas") if form.is_bound else 1
        load = (
            form.load()
            if form.is_bound
            else estimates.Load(*(form.fields[name].initial for name in DeployForm.LOAD_FIELDS))
        )
        return {
            "estimate": estimates.break_even(
                token_price=token_price(version),
                dedicated_per_hour=option.per_hour if option else None,
                replicas=max(replicas or 0, 1),
                load=load,
            ),
            "estimate_profile": option,
            "estimate_replicas": max(replicas or 0, 1),
            "load": load,
            "estimated_at": timezone.now(),
        }


class DeployEstimateView(DeployView):
    """The estimate panel alone, for htmx to refresh while the form is filled in. A POST (of the
    form as it stands) so the CSRF token never lands in a URL; it writes nothing."""

    def post(self, request, slug):
        self.setup_model(slug)
        version = self.version_named(request.POST.get("version"))
        form, options = self.make_form(request.POST, version=version)
        form.is_valid()  # field errors wait for the real submit; this uses what is valid
        return self.render(
            "console/deployments/_estimate.html", self.estimate_context(form, version, options)
        )


def default_deployment_name(organization, slug: str) -> str:
    """A DNS-safe name to start from that the organization has not taken: the model slug
    without dots, else with -2, -3… after it."""
    base = slug.replace(".", "-")[:60].strip("-")
    taken = set(
        selectors.deployment_list(organization=organization)
        .exclude(status=Deployment.Status.DELETED)
        .filter(name__startswith=base)
        .values_list("name", flat=True)
    )
    if base not in taken:
        return base
    return next(f"{base}-{n}" for n in range(2, len(taken) + 3) if f"{base}-{n}" not in taken)


def _money(amount, currency):
    from console.templatetags.console import money

    return money(amount, currency)
