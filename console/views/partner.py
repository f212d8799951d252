"""Enabling a partner-hosted model: its publisher's terms shown in full, accepted for the
organization (catalog.terms: who, when, which version) and a serverless entry made, in the
same services the REST API uses."""

from django.contrib import messages
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect

from accounts.roles import Permission
from catalog import selectors as catalog_selectors
from catalog.providers import partner_status
from catalog.terms import terms_accept, terms_accepted, terms_in_force
from console.forms import EnableForm
from console.views.base import ConsoleView, apply_domain_error
from console.views.catalog import token_price
from controlplane.errors import DomainError
from deployments import services


class EnableModelView(ConsoleView):
    section = "models"
    list_url_name = "console:models"
    required_permissions = {
        "GET": Permission.DEPLOYMENTS_WRITE,
        "POST": Permission.DEPLOYMENTS_WRITE,
    }

    def setup_model(self, slug):
        organization = self.request.actor.organization
        self.model = catalog_selectors.model_by_slug(organization=organization, slug=slug)
        if not self.model.is_partner:
            raise Http404("This model is self-hosted: deploy it instead.")
        versions = [
            v
            for v in catalog_selectors.model_versions_for_detail(model=self.model)
            if v.status == v.Status.PUBLISHED
        ]
        if not versions:
            raise Http404("This model has no published version to enable.")
        wanted = self.request.GET.get("version") or self.request.POST.get("version")
        self.version = next((v for v in versions if v.version == wanted), versions[0])
        self.terms = terms_in_force(version_id=self.version.pk)

    def get(self, request, slug):
        from console.views.deployments import default_deployment_name

        self.setup_model(slug)
        form = EnableForm(
            initial={
                "name": default_deployment_name(request.actor.organization, self.model.slug),
                "terms_version": self.terms.version if self.terms else "",
            }
        )
        return self.show(form)

    def post(self, request, slug):
        self.setup_model(slug)
        form = EnableForm(request.POST)
        if not self.terms:
            form.fields["accept"].required = False
        if form.is_valid():
            try:
                with transaction.atomic():
                    if self.terms:
                        terms_accept(
                            actor=request.actor,
                            version=self.version,
                            terms_version=form.cleaned_data["terms_version"],
                        )
                    deployment = services.deployment_create(
                        actor=request.actor,
                        name=form.cleaned_data["name"],
                        model=self.model.slug,
                        version=self.version.version,
                        type="serverless",
                    )
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                messages.success(
                    request, f"{self.model.display_name} is enabled: call it as {deployment.name}."
                )
                return redirect("console:deployment", deployment_id=deployment.pk)
        return self.show(form, status=400)

    def show(self, form, *, status=200):
        organization = self.request.actor.organization
        accepted = self.terms is not None and terms_accepted(
            organization_id=organization.pk, version_id=self.version.pk
        )
        return self.render(
            "console/catalog/enable.html",
            {
                "model": self.model,
                "version": self.version,
                "terms": self.terms,
                "already_accepted": accepted,
                "availability": partner_status(self.version),
                "token_price": token_price(self.version),
                "form": form,
            },
            status=status,
        )
