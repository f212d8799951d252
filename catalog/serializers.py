import markdown
import nh3
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from catalog.models import (
    DedicatedPrice,
    HardwareProfile,
    Model,
    ModelArtifact,
    ModelVersion,
    ProviderConnection,
    ProviderCost,
    ProviderModel,
    ServingRuntime,
    TermsAcceptance,
    TermsOfUse,
    TokenPrice,
)
from catalog.providers import partner_status
from catalog.selectors import profile_fit
from catalog.terms import terms_in_force
from controlplane.rest.serializers import MoneyField, StrictSerializer

MODEL_FACT_FIELDS = [
    "slug",
    "display_name",
    "publisher",
    "hosting",
    "family",
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
    "visibility",
]


class TokenPriceSerializer(serializers.ModelSerializer):
    class Meta:
        model = TokenPrice
        fields = [
            "currency",
            "input_per_million",
            "cached_input_per_million",
            "output_per_million",
            "effective_from",
        ]
        read_only_fields = fields


class DedicatedPriceSerializer(serializers.ModelSerializer):
    hardware_profile = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = DedicatedPrice
        fields = ["hardware_profile", "currency", "per_hour", "effective_from"]
        read_only_fields = fields


_PER_MILLION = serializers.DecimalField(max_digits=12, decimal_places=6)
_TIMESTAMP = serializers.DateTimeField()


def price_data(price: TokenPrice) -> dict:
    """TokenPriceSerializer's output, without building a serializer per list item."""
    return {
        "currency": price.currency,
        "input_per_million": _PER_MILLION.to_representation(price.input_per_million),
        "cached_input_per_million": (
            None
            if price.cached_input_per_million is None
            else _PER_MILLION.to_representation(price.cached_input_per_million)
        ),
        "output_per_million": _PER_MILLION.to_representation(price.output_per_million),
        "effective_from": _TIMESTAMP.to_representation(price.effective_from),
    }


class ModelListSerializer(serializers.ModelSerializer):
    """A list item: the facts, the newest published version and the cheapest current price.
    Reads only what model_list_for_api prefetched."""

    latest_version = serializers.SerializerMethodField()
    runtimes = serializers.SerializerMethodField()
    weights_imported = serializers.SerializerMethodField()
    price_from = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = [
            *MODEL_FACT_FIELDS,
            "latest_version",
            "runtimes",
            "weights_imported",
            "price_from",
        ]
        read_only_fields = fields

    def to_representation(self, model):
        # The same output as the declared fields (which document it), built directly: the
        # generic field-by-field path costs more than the list's SQL at 50 items a page.
        data = {name: getattr(model, name) for name in MODEL_FACT_FIELDS}
        data["latest_version"] = self.get_latest_version(model)
        data["runtimes"] = self.get_runtimes(model)
        data["weights_imported"] = self.get_weights_imported(model)
        data["price_from"] = self.get_price_from(model)
        return data

    def _versions(self, model) -> list[ModelVersion]:
        return getattr(model, "published_versions", [])

    def get_latest_version(self, model) -> str | None:
        versions = self._versions(model)
        return versions[0].version if versions else None

    def get_runtimes(self, model) -> list[str]:
        return sorted({v.serving_runtime.name for v in self._versions(model) if v.serving_runtime})

    def get_weights_imported(self, model) -> bool:
        versions = self._versions(model)
        return bool(versions) and versions[0].weights_imported

    @extend_schema_field(TokenPriceSerializer(allow_null=True))
    def get_price_from(self, model) -> dict | None:
        current = [v.prices_in_force[0] for v in self._versions(model) if v.prices_in_force]
        if not current:
            return None
        cheapest = min(current, key=lambda p: p.input_per_million + p.output_per_million)
        return price_data(cheapest)


class ServingRuntimeSerializer(serializers.ModelSerializer):
    class Meta:
        model = ServingRuntime
        fields = ["name", "display_name", "device", "image", "port"]
        read_only_fields = fields


class VersionProfileSerializer(serializers.Serializer):
    """How one hardware profile suits a version: fit, why, and the price if it fits."""

    name = serializers.CharField()
    display_name = serializers.CharField()
    fits = serializers.BooleanField()
    reason = serializers.CharField()
    required_gb = serializers.DecimalField(max_digits=12, decimal_places=2)
    available_gb = serializers.DecimalField(max_digits=12, decimal_places=2)
    dedicated_price = DedicatedPriceSerializer(allow_null=True)


class ProviderModelSerializer(serializers.Serializer):
    """Who serves a partner version; never which credential (the connection's name only)."""

    kind = serializers.CharField()
    provider_model_id = serializers.CharField()
    status = serializers.ChoiceField(choices=["available", "needs_connection"])


class TermsSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = TermsOfUse
        fields = ["version", "title", "url", "effective_from"]
        read_only_fields = fields


class ModelVersionSerializer(serializers.ModelSerializer):
    serving_runtime = ServingRuntimeSerializer(read_only=True, allow_null=True)
    provider = serializers.SerializerMethodField()
    terms = serializers.SerializerMethodField()
    weights_imported = serializers.BooleanField(read_only=True)
    files = serializers.SerializerMethodField()
    token_price = serializers.SerializerMethodField()
    hardware_profiles = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = [
            "version",
            "status",
            "weights_format",
            "dtype",
            "size_bytes",
            "weights_imported",
            "files",
            "serving_runtime",
            "runtime_args",
            "served_model_name",
            "required_memory_gb",
            "min_gpu_memory_gb",
            "created_at",
            "published_at",
            "deprecated_at",
            "token_price",
            "provider",
            "terms",
            "hardware_profiles",
        ]
        read_only_fields = fields

    @extend_schema_field(ProviderModelSerializer(allow_null=True))
    def get_provider(self, version) -> dict | None:
        """For a partner-hosted version: the provider model that serves it, and whether the
        platform is connected to it (`needs_connection` until an operator adds one)."""
        status = partner_status(version)
        if status is None:
            return None
        mapping = getattr(version, "provider_model", None)
        return {
            "kind": mapping.kind if mapping else "",
            "provider_model_id": mapping.provider_model_id if mapping else "",
            "status": status,
        }

    @extend_schema_field(TermsSummarySerializer(allow_null=True))
    def get_terms(self, version) -> dict | None:
        """The terms of use in force, which an organization accepts before using the version."""
        terms = terms_in_force(version_id=version.pk)
        return TermsSummarySerializer(terms).data if terms else None

    def get_files(self, version) -> int:
        return len(version.artifacts.all())

    @extend_schema_field(TokenPriceSerializer(allow_null=True))
    def get_token_price(self, version) -> dict | None:
        prices = version.token_prices.all()
        return price_data(prices[0]) if prices else None

    @extend_schema_field(VersionProfileSerializer(many=True))
    def get_hardware_profiles(self, version) -> list[dict]:
        """Every active profile: those that fit first, each with why and its price. None for
        a partner-hosted version (its provider serves it)."""
        if version.serving_runtime_id is None:
            return []
        current = {}
        for price in version.dedicated_prices.all():  # newest first: keep the first per profile
            current.setdefault(price.hardware_profile_id, price)
        rows = []
        for profile in self.context.get("profiles", []):
            fit = profile_fit(version=version, profile=profile)
            price = current.get(profile.pk) if fit.fits else None
            if price is not None:
                price.hardware_profile = profile
            rows.append(
                {
                    "name": profile.name,
                    "display_name": profile.display_name,
                    "fits": fit.fits,
                    "reason": fit.reason,
                    "required_gb": fit.required_gb,
                    "available_gb": fit.available_gb,
                    "dedicated_price": price,
                }
            )
        rows.sort(key=lambda row: not row["fits"])
        return VersionProfileSerializer(rows, many=True).data


class ModelDetailSerializer(serializers.ModelSerializer):
    description_html = serializers.SerializerMethodField()
    versions = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = [
            *MODEL_FACT_FIELDS,
            "description",
            "description_html",
            "created_at",
            "updated_at",
            "versions",
        ]
        read_only_fields = fields

    def get_description_html(self, model) -> str:
        """The model card rendered, with anything a browser could run stripped."""
        return nh3.clean(markdown.markdown(model.description, extensions=["tables", "fenced_code"]))

    @extend_schema_field(ModelVersionSerializer(many=True))
    def get_versions(self, model) -> list[dict]:
        return ModelVersionSerializer(
            self.context["versions"], many=True, context=self.context
        ).data


class HardwareProfileSerializer(serializers.ModelSerializer):
    device = serializers.SerializerMethodField()

    class Meta:
        model = HardwareProfile
        fields = [
            "name",
            "display_name",
            "device",
            "gpu_model",
            "gpu_count",
            "gpu_memory_gb",
            "cpu_request",
            "memory_request",
            "node_selector",
            "tolerations",
            "price_per_hour",
            "currency",
        ]
        read_only_fields = fields

    def get_device(self, profile) -> str:
        return ServingRuntime.Device.CPU if profile.is_cpu else ServingRuntime.Device.GPU


class ModelArtifactSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ModelArtifact
        fields = ["path", "size_bytes", "sha256", "download_url"]
        read_only_fields = fields

    def get_download_url(self, artifact) -> str:
        return self.context["store"].presigned_url(
            f"{self.context['prefix']}/{artifact.path}", expires_in=3600
        )


# --- operator input -----------------------------------------------------------------------


class ModelWriteSerializer(StrictSerializer):
    display_name = serializers.CharField(max_length=200)
    publisher = serializers.CharField(max_length=100)
    hosting = serializers.ChoiceField(choices=Model.Hosting.choices, required=False)
    family = serializers.CharField(max_length=100, required=False, allow_blank=True)
    description = serializers.CharField(required=False, allow_blank=True)
    tasks = serializers.ListField(
        child=serializers.ChoiceField(choices=Model.Task.choices), allow_empty=False
    )
    languages = serializers.ListField(child=serializers.CharField(max_length=3), required=False)
    license = serializers.CharField(max_length=100)
    context_length = serializers.IntegerField(min_value=1)
    architecture = serializers.ChoiceField(choices=Model.Architecture.choices)
    num_experts = serializers.IntegerField(min_value=2, required=False, allow_null=True)
    experts_per_token = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    total_parameters = serializers.IntegerField(min_value=1)
    active_parameters = serializers.IntegerField(min_value=1)
    tags = serializers.ListField(child=serializers.CharField(max_length=50), required=False)


class ModelCreateSerializer(ModelWriteSerializer):
    slug = serializers.RegexField(
        r"^[a-z0-9]([a-z0-9.-]{0,98}[a-z0-9])?$",
        error_messages={"invalid": "Use lowercase letters, digits, dots or hyphens."},
    )
    organization = serializers.SlugField(
        required=False, help_text="Slug of the organization a private model belongs to."
    )


class ModelUpdateSerializer(ModelWriteSerializer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, partial=True, **kwargs)


class ModelVersionWriteSerializer(StrictSerializer):
    serving_runtime = serializers.ChoiceField(
        choices=ServingRuntime.Name.choices,
        required=False,
        help_text="Required for a self-hosted model; absent for a partner-hosted one.",
    )
    weights_format = serializers.ChoiceField(
        choices=ModelVersion.WeightsFormat.choices, required=False
    )
    dtype = serializers.ChoiceField(choices=ModelVersion.Dtype.choices, required=False)
    size_bytes = serializers.IntegerField(min_value=0, required=False)
    runtime_args = serializers.DictField(required=False)
    served_model_name = serializers.CharField(max_length=200, required=False, allow_blank=True)


class ModelVersionCreateSerializer(ModelVersionWriteSerializer):
    version = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$",
        error_messages={"invalid": "Use letters, digits, dots, - or _ (at most 50)."},
    )


class ModelVersionUpdateSerializer(ModelVersionWriteSerializer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, partial=True, **kwargs)


class TokenPriceCreateSerializer(StrictSerializer):
    currency = serializers.RegexField(r"^[A-Z]{3}$", default="USD")
    input_per_million = MoneyField(max_digits=12, decimal_places=6, min_value=0)
    cached_input_per_million = MoneyField(
        max_digits=12,
        decimal_places=6,
        min_value=0,
        required=False,
        allow_null=True,
        help_text="Prompt tokens served from the prefix cache (a discount on the input price); "
        "leave out for no discount.",
    )
    output_per_million = MoneyField(max_digits=12, decimal_places=6, min_value=0)
    effective_from = serializers.DateTimeField(required=False)


class DedicatedPriceCreateSerializer(StrictSerializer):
    hardware_profile = serializers.SlugRelatedField(
        slug_field="name", queryset=HardwareProfile.objects.all()
    )
    currency = serializers.RegexField(r"^[A-Z]{3}$", default="USD")
    per_hour = MoneyField(max_digits=12, decimal_places=4, min_value=0)
    effective_from = serializers.DateTimeField(required=False)


# --- partner-hosted models ------------------------------------------------------------------


class ProviderConnectionSerializer(serializers.ModelSerializer):
    """A connection as operators see it: never its credential, only whether it has one."""

    has_credential = serializers.BooleanField(read_only=True)

    class Meta:
        model = ProviderConnection
        fields = [
            "name",
            "display_name",
            "kind",
            "base_url",
            "has_credential",
            "requests_per_minute",
            "tokens_per_minute",
            "tenant_share_percent",
            "timeout_seconds",
            "is_active",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ProviderConnectionWriteSerializer(StrictSerializer):
    display_name = serializers.CharField(max_length=100, required=False)
    base_url = serializers.CharField(max_length=300, help_text="http:// or https:// only.")
    credential = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        trim_whitespace=True,
        style={"input_type": "password"},
        help_text='The provider\'s API key. Stored encrypted; never returned. "" removes it.',
    )
    requests_per_minute = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tokens_per_minute = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tenant_share_percent = serializers.IntegerField(min_value=1, max_value=100, required=False)
    timeout_seconds = serializers.IntegerField(min_value=1, max_value=3600, required=False)
    is_active = serializers.BooleanField(required=False)


class ProviderConnectionCreateSerializer(ProviderConnectionWriteSerializer):
    name = serializers.RegexField(
        r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$",
        error_messages={"invalid": "Use 1-64 lowercase letters, digits or hyphens."},
    )
    # A plain string, checked by the service, so an unknown kind gets the same sentence from
    # the REST API, the admin and the commands.
    kind = serializers.CharField(
        max_length=32, help_text=f"One of: {', '.join(ProviderConnection.Kind.values)}."
    )


class ProviderConnectionUpdateSerializer(ProviderConnectionWriteSerializer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, partial=True, **kwargs)


class ProviderModelDetailSerializer(serializers.ModelSerializer):
    connection = serializers.SlugRelatedField(slug_field="name", read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = ProviderModel
        fields = ["kind", "provider_model_id", "connection", "status", "updated_at"]
        read_only_fields = fields

    def get_status(self, mapping) -> str:
        return "needs_connection" if mapping.needs_connection else "available"


class ProviderModelWriteSerializer(StrictSerializer):
    provider_model_id = serializers.CharField(max_length=200)
    kind = serializers.CharField(max_length=32, required=False)
    connection = serializers.CharField(
        max_length=64, required=False, allow_null=True, help_text="A provider connection's name."
    )


class ProviderCostSerializer(serializers.ModelSerializer):
    class Meta:
        model = ProviderCost
        fields = ["currency", "input_per_million", "output_per_million", "effective_from"]
        read_only_fields = fields


class ProviderCostCreateSerializer(StrictSerializer):
    # No default: a cost without its currency is a 400, never silently USD.
    currency = serializers.RegexField(
        r"^[A-Z]{3}$", error_messages={"invalid": "Use an ISO 4217 code such as USD or EUR."}
    )
    input_per_million = MoneyField(max_digits=12, decimal_places=6, min_value=0)
    output_per_million = MoneyField(max_digits=12, decimal_places=6, min_value=0)
    effective_from = serializers.DateTimeField(required=False)


class TermsSerializer(serializers.ModelSerializer):
    accepted = serializers.SerializerMethodField()
    body_html = serializers.SerializerMethodField()

    class Meta:
        model = TermsOfUse
        fields = ["version", "title", "body", "body_html", "url", "effective_from", "accepted"]
        read_only_fields = fields

    def get_accepted(self, terms) -> bool:
        """Whether your organization accepted this version of the terms."""
        return terms.pk in self.context.get("accepted_ids", ())

    def get_body_html(self, terms) -> str:
        return nh3.clean(markdown.markdown(terms.body, extensions=["tables"]))


class TermsCreateSerializer(StrictSerializer):
    version = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")
    title = serializers.CharField(max_length=200)
    body = serializers.CharField()
    url = serializers.URLField(max_length=500, required=False, allow_blank=True)
    effective_from = serializers.DateTimeField(required=False)


class TermsAcceptSerializer(StrictSerializer):
    version = serializers.CharField(
        max_length=50, help_text="The version of the terms you read (GET …/terms)."
    )


class TermsAcceptanceSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="terms.model_version.model.slug", read_only=True)
    model_version = serializers.CharField(source="terms.model_version.version", read_only=True)
    terms_version = serializers.CharField(source="terms.version", read_only=True)

    class Meta:
        model = TermsAcceptance
        fields = ["model", "model_version", "terms_version", "accepted_by_label", "accepted_at"]
        read_only_fields = fields
