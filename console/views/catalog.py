from dataclasses import dataclass
from decimal import Decimal

from django.core.paginator import Paginator
from django.http import Http404
from rest_framework.exceptions import ValidationError

from catalog import selectors
from catalog.offers import private_offer_in_force
from catalog.providers import partner_status
from catalog.terms import terms_accepted, terms_in_force
from console import estimates
from console.filters import ConsoleModelFilter
from console.views.base import ConsoleView


@dataclass(frozen=True)
class HardwareOption:
    """One hardware profile as the model page shows it for a version."""

    profile: object
    fit: selectors.Fit
    per_hour: Decimal | None  # the dedicated price in force; None: not offered there
    currency: str

    @property
    def monthly(self) -> Decimal | None:
        return None if self.per_hour is None else estimates.monthly_cost(self.per_hour)

    @property
    def deployable(self) -> bool:
        return self.fit.fits and self.per_hour is not None


def hardware_options(version, profiles) -> list[HardwareOption]:
    """Every active profile for `version`: fit (catalog's rule) and price in force. Uses the
    prices prefetched by `model_versions_for_detail`, newest first, so it runs no query."""
    prices = {}
    for price in version.dedicated_prices.all():
        prices.setdefault(price.hardware_profile_id, price)
    options = []
    for profile in profiles:
        price = prices.get(profile.pk)
        options.append(
            HardwareOption(
                profile=profile,
                fit=selectors.profile_fit(version=version, profile=profile),
                per_hour=price.per_hour if price else None,
                currency=price.currency if price else profile.currency,
            )
        )
    return sorted(options, key=lambda o: (not o.deployable, o.per_hour or Decimal(0)))


def token_price(version):
    """The per-token price in force (prefetched newest first), or None."""
    prices = version.token_prices.all()
    return prices[0] if prices else None


class ModelDetailView(ConsoleView):
    section = "models"
    list_url_name = "console:models"

    def get(self, request, slug):
        model = selectors.model_by_slug(organization=request.actor.organization, slug=slug)
        versions = list(selectors.model_versions_for_detail(model=model))
        published = [v for v in versions if v.status == v.Status.PUBLISHED]
        if not published:
            raise Http404("This model has no published version.")
        chosen = published[0]
        wanted = request.GET.get("version")
        if wanted:
            chosen = next((v for v in versions if v.version == wanted), None)
            if chosen is None:
                raise Http404(f"{model.slug} has no version {wanted!r}.")
        options = hardware_options(chosen, selectors.hardware_profile_list())
        partner = None
        if model.is_partner:  # no hardware: its publisher's API serves it
            options = []
            partner = {
                "availability": partner_status(chosen),
                "terms": terms_in_force(version_id=chosen.pk),
                "accepted": terms_accepted(
                    organization_id=request.actor.organization.pk, version_id=chosen.pk
                ),
            }
        return self.render(
            "console/catalog/model_detail.html",
            {
                "model": model,
                "versions": [(v, token_price(v), selectors.version_features(v)) for v in versions],
                "version": chosen,
                "features": selectors.version_features(chosen),
                "token_price": token_price(chosen),
                "your_price": private_offer_in_force(
                    organization_id=request.actor.organization.pk, version_id=chosen.pk
                ),
                "partner": partner,
                "fitting": [o for o in options if o.deployable],
                "not_fitting": [o for o in options if not o.deployable],
            },
        )


class ModelListView(ConsoleView):
    """The catalog: the REST API's selector and filterset, a search box and a page of models."""

    section = "models"
    page_size = 24

    def get(self, request):
        organization = request.actor.organization
        models = selectors.model_list_for_api(organization=organization)
        # The license picker's choices. Of every visible model, drafts included: one column
        # of one table, where asking for published versions would cost a subquery a model.
        licenses = sorted(
            set(
                selectors.visible_models(organization=organization)
                .order_by()
                .values_list("license", flat=True)
                .distinct()
            )
        )
        filterset = ConsoleModelFilter(request.GET, queryset=models, licenses=licenses)
        status = 200
        if filterset.is_valid():
            try:
                results = list_page_queryset(filterset.qs)
                page = Paginator(results, self.page_size).get_page(request.GET.get("page"))
            except ValidationError as error:  # DRF's: a value no visible model has
                for field, problems in error.detail.items():
                    for problem in problems:
                        known = field if field in filterset.form.fields else None
                        filterset.form.add_error(known, str(problem))
        if filterset.form.errors:
            status = 400
            page = Paginator(models.none(), self.page_size).get_page(1)
        query = request.GET.copy()
        query.pop("page", None)
        return self.render(
            "console/catalog/model_list.html",
            {
                "filterset": filterset,
                "form": filterset.form,
                "page": page,
                "rows": [(model, list_price(model)) for model in page],
                "query": query.urlencode(),
                "filtered": any(v for k, v in request.GET.items() if k != "page"),
            },
            status=status,
        )


def list_page_queryset(queryset):
    # By slug, the unique index: the page is read off the index instead of sorting every
    # visible model.
    return queryset.order_by("slug")


def list_price(model):
    """The token price in force of the newest published version, or None. Both come
    prefetched by `model_list_for_api`, newest first."""
    for version in model.published_versions:
        if version.prices_in_force:
            return version.prices_in_force[0]
    return None
