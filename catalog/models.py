"""The catalog: serving runtimes, hardware profiles, models, their versions, artifacts and prices.

Everything a deployment or an invoice line points at lives here. Memory requirements of a
version are derived (see `catalog.fit`) and stored, so "deployable on this profile" is a plain
indexed comparison in SQL, on SQLite and PostgreSQL alike.
"""

import uuid
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

currency_validator = RegexValidator(r"^[A-Z]{3}$", "Use an ISO 4217 code such as USD or EUR.")
model_slug_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9.-]{0,98}[a-z0-9])?$",
    "Use 1-100 lowercase letters, digits, dots or hyphens, starting and ending with a letter "
    "or digit (e.g. mixtral-8x7b-instruct-v0.1).",
)
profile_name_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$",
    "Use 1-64 lowercase letters, digits or hyphens (e.g. h100-80gb-x2).",
)


def _validate_string_list(value):
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Give a list of strings.")


def _validate_string_dict(value):
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationError('Give an object of string labels, e.g. {"gpu": "h100"}.')


def _validate_memory_quantity(value):
    from catalog.fit import quantity_to_bytes

    try:
        quantity_to_bytes(value)
    except ValueError as error:
        raise ValidationError(str(error)) from error


class ServingRuntime(models.Model):
    """A program that serves a model version: its pinned image, ports, health paths and the
    argument template the provisioner fills in (placeholders in braces, e.g. {model_path})."""

    class Name(models.TextChoices):
        VLLM = "vllm", "vLLM"
        BUILTIN = "builtin", "Sirocco builtin runtime"

    class Device(models.TextChoices):
        GPU = "gpu", "GPU"
        CPU = "cpu", "CPU"

    name = models.CharField(max_length=32, unique=True, choices=Name.choices)
    display_name = models.CharField(max_length=100)
    image = models.CharField(max_length=200, help_text="Pinned image reference, never :latest.")
    device = models.CharField(max_length=8, choices=Device.choices)
    port = models.PositiveIntegerField(default=8000)
    health_path = models.CharField(max_length=200, default="/health")
    readiness_path = models.CharField(max_length=200, default="/v1/models")
    args_template = models.JSONField(default=list, validators=[_validate_string_list])
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class HardwareProfile(models.Model):
    """A shape of replica: GPUs (or none, for CPU), requests, scheduling labels and a price."""

    name = models.SlugField(max_length=64, unique=True, validators=[profile_name_validator])
    display_name = models.CharField(max_length=100)
    gpu_model = models.CharField(max_length=100, blank=True, help_text='"" for CPU profiles.')
    gpu_count = models.PositiveSmallIntegerField(default=0)
    gpu_memory_gb = models.PositiveIntegerField(default=0, help_text="Per GPU, in GB.")
    cpu_request = models.CharField(max_length=16, help_text='Kubernetes quantity, e.g. "16".')
    memory_request = models.CharField(
        max_length=16,
        validators=[_validate_memory_quantity],
        help_text='Kubernetes quantity, e.g. "128Gi".',
    )
    node_selector = models.JSONField(default=dict, blank=True, validators=[_validate_string_dict])
    tolerations = models.JSONField(default=list, blank=True)
    price_per_hour = models.DecimalField(
        max_digits=12, decimal_places=4, validators=[MinValueValidator(0)]
    )
    currency = models.CharField(max_length=3, default="USD", validators=[currency_validator])
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["gpu_count", "gpu_memory_gb", "name"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(gpu_count=0) & Q(gpu_memory_gb=0))
                | (Q(gpu_count__gt=0) & Q(gpu_memory_gb__gt=0)),
                name="hardware_profile_gpu_count_and_memory_agree",
            )
        ]

    def __str__(self):
        return self.name

    @property
    def is_cpu(self) -> bool:
        return self.gpu_count == 0

    @property
    def total_gpu_memory_gb(self) -> int:
        return self.gpu_count * self.gpu_memory_gb


class Model(models.Model):
    """A model as customers browse it: facts, the model card, and who may see it."""

    class Architecture(models.TextChoices):
        DENSE = "dense", "Dense"
        MOE = "moe", "Mixture of experts"

    class Visibility(models.TextChoices):
        PUBLIC = "public", "Public"
        PRIVATE = "private", "Private to one organization"

    class Hosting(models.TextChoices):
        SELF_HOSTED = "self_hosted", "Self-hosted (our replicas serve its weights)"
        PARTNER = "partner", "Partner-hosted (a provider's API serves it)"

    class Task(models.TextChoices):
        CHAT = "chat", "Chat"
        COMPLETION = "completion", "Text completion"
        EMBEDDINGS = "embeddings", "Embeddings"
        FUNCTION_CALLING = "function-calling", "Function calling"

    slug = models.CharField(max_length=100, unique=True, validators=[model_slug_validator])
    display_name = models.CharField(max_length=200)
    publisher = models.CharField(max_length=100)
    # A partner-hosted model has no weights here: its versions are served by a provider
    # connection (catalog.providers), need no hardware, and are offered serverless only.
    hosting = models.CharField(max_length=16, choices=Hosting.choices, default=Hosting.SELF_HOSTED)
    family = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True, help_text="The model card, in Markdown.")
    tasks = models.JSONField(default=list, validators=[_validate_string_list])
    languages = models.JSONField(
        default=list, validators=[_validate_string_list], help_text="ISO 639-1 codes."
    )
    license = models.CharField(max_length=100, help_text="SPDX id where there is one.")
    context_length = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    architecture = models.CharField(max_length=8, choices=Architecture.choices)
    num_experts = models.PositiveSmallIntegerField(null=True, blank=True)
    experts_per_token = models.PositiveSmallIntegerField(null=True, blank=True)
    total_parameters = models.BigIntegerField(validators=[MinValueValidator(1)])
    active_parameters = models.BigIntegerField(validators=[MinValueValidator(1)])
    tags = models.JSONField(default=list, blank=True, validators=[_validate_string_list])
    visibility = models.CharField(
        max_length=8, choices=Visibility.choices, default=Visibility.PUBLIC
    )
    organization = models.ForeignKey(
        "accounts.Organization",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="private_models",
        help_text="The only organization that sees a private model; empty for public ones.",
    )
    # Derived in save(): lowercase text the list endpoint searches and filters with LIKE, so the
    # JSON lists (tasks, languages, tags) filter the same way on SQLite and PostgreSQL.
    search_text = models.TextField(blank=True, editable=False)
    facets = models.TextField(blank=True, editable=False)
    # Derived from the published versions by refresh_listings() whenever a version is saved or
    # deleted, so the list endpoint filters and counts one table: "has a published version"
    # and "fits a profile" (the least memory any published version needs, per device).
    is_listed = models.BooleanField(default=False, editable=False)
    least_gpu_memory_gb = models.PositiveIntegerField(null=True, blank=True, editable=False)
    least_cpu_memory_gb = models.DecimalField(
        max_digits=10, decimal_places=2, null=True, blank=True, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(visibility="public") & Q(organization__isnull=True))
                | (Q(visibility="private") & Q(organization__isnull=False)),
                name="model_private_iff_organization",
            ),
            models.CheckConstraint(
                condition=(
                    Q(architecture="dense")
                    & Q(num_experts__isnull=True)
                    & Q(experts_per_token__isnull=True)
                )
                | (
                    Q(architecture="moe")
                    & Q(num_experts__gt=1)
                    & Q(experts_per_token__gt=0)
                    & Q(experts_per_token__lte=models.F("num_experts"))
                ),
                name="model_experts_match_architecture",
            ),
            models.CheckConstraint(
                condition=Q(active_parameters__lte=models.F("total_parameters")),
                name="model_active_parameters_at_most_total",
            ),
        ]
        indexes = [
            models.Index(fields=["publisher"]),
            models.Index(fields=["context_length"]),
            # Covers the list's count: every column its filters read, so counting 10,000 models
            # scans this index instead of the table (whose rows carry whole model cards).
            models.Index(
                fields=[
                    "is_listed",
                    "organization",
                    "least_gpu_memory_gb",
                    "least_cpu_memory_gb",
                    "facets",
                ],
                name="catalog_model_listing_idx",
            ),
        ]

    def __str__(self):
        return self.slug

    def save(self, *args, **kwargs):
        self.refresh_search_fields()
        if kwargs.get("update_fields") is not None:
            kwargs["update_fields"] = {*kwargs["update_fields"], "search_text", "facets"}
        super().save(*args, **kwargs)

    def refresh_search_fields(self) -> None:
        """Recompute `search_text` and `facets`; bulk writers call this before bulk_create."""
        self.search_text = " ".join(
            [
                self.slug,
                self.display_name,
                self.publisher,
                self.family,
                *self.tags,
                self.description,
            ]
        ).lower()
        self.facets = facet_text(tasks=self.tasks, languages=self.languages, tags=self.tags)

    @property
    def is_partner(self) -> bool:
        return self.hosting == self.Hosting.PARTNER


def facet_token(kind: str, value: str) -> str:
    """How one facet value is written in Model.facets; filters look for exactly this."""
    return f" {kind}:{value.strip().lower()} "


def facet_text(*, tasks, languages, tags) -> str:
    parts = [facet_token("task", t) for t in tasks]
    parts += [facet_token("lang", lang) for lang in languages]
    parts += [facet_token("tag", t) for t in tags]
    # Tokens are space-delimited on both sides, so " task:chat " never matches "task:chatty".
    return "".join(parts).replace("  ", " ")


class ModelVersion(models.Model):
    """One servable build of a model: weights, the runtime that serves them, and its status."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        PUBLISHED = "published", "Published"
        DEPRECATED = "deprecated", "Deprecated"

    class WeightsFormat(models.TextChoices):
        SAFETENSORS = "safetensors", "safetensors (Hugging Face)"
        GGUF = "gguf", "GGUF"

    class Dtype(models.TextChoices):
        FLOAT32 = "float32", "float32"
        BFLOAT16 = "bfloat16", "bfloat16"
        FLOAT16 = "float16", "float16"
        FP8 = "fp8", "FP8"
        INT8 = "int8", "int8"
        INT4 = "int4", "int4"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    version = models.CharField(
        max_length=50,
        validators=[
            RegexValidator(
                r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$", "Use letters, digits, dots, - or _."
            )
        ],
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    weights_format = models.CharField(
        max_length=16, choices=WeightsFormat.choices, default=WeightsFormat.SAFETENSORS
    )
    dtype = models.CharField(max_length=16, choices=Dtype.choices, default=Dtype.BFLOAT16)
    size_bytes = models.BigIntegerField(
        default=0,
        validators=[MinValueValidator(0)],
        help_text="Total size of the weights; 0 until known (then params × dtype size is used).",
    )
    serving_runtime = models.ForeignKey(
        ServingRuntime,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="model_versions",
        help_text="Empty for a partner-hosted model's versions: a provider serves them.",
    )
    runtime_args = models.JSONField(default=dict, blank=True)
    # Derived in save() from the weights and runtime_args (see catalog.fit): what a replica
    # needs, so that "fits this profile" is a comparison the database can do.
    required_memory_gb = models.DecimalField(
        max_digits=10, decimal_places=2, default=Decimal(0), editable=False
    )
    min_gpu_memory_gb = models.PositiveIntegerField(
        default=0,
        editable=False,
        help_text="Least total GPU memory (GB, all GPUs of a replica) this version fits in.",
    )
    artifact_uri = models.CharField(
        max_length=500, blank=True, help_text='Store URI of the weights folder; "" if not imported.'
    )
    served_model_name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)
    deprecated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["model", "-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["model", "version"], name="unique_model_version")
        ]
        indexes = [
            # Serves "has a published version" and "has one that fits N GB" per model alike;
            # an index led by status instead makes SQLite scan every version per model.
            models.Index(
                fields=["model", "status", "min_gpu_memory_gb"], name="catalog_version_fit_idx"
            ),
        ]

    def __str__(self):
        return f"{self.model.slug}:{self.version}" if self.model_id else self.version

    def save(self, *args, **kwargs):
        from catalog.fit import version_requirements

        if not self.served_model_name and self.model_id:
            self.served_model_name = self.model.slug
        requirements = version_requirements(self)
        self.required_memory_gb = requirements.required_gb
        self.min_gpu_memory_gb = requirements.min_gpu_memory_gb
        if kwargs.get("update_fields") is not None:
            kwargs["update_fields"] = {
                *kwargs["update_fields"],
                "required_memory_gb",
                "min_gpu_memory_gb",
                "served_model_name",
            }
        super().save(*args, **kwargs)
        refresh_listings([self.model_id])

    def delete(self, *args, **kwargs):
        model_id = self.model_id
        result = super().delete(*args, **kwargs)
        refresh_listings([model_id])
        return result

    @property
    def weights_imported(self) -> bool:
        return bool(self.artifact_uri)

    @property
    def is_partner(self) -> bool:
        return self.model.hosting == Model.Hosting.PARTNER


def refresh_listings(model_ids) -> None:
    """Recompute Model.is_listed / least_gpu_memory_gb / least_cpu_memory_gb of `model_ids`
    from their published versions (one aggregate query, one bulk update). Callers that bulk
    insert versions call it themselves; ModelVersion.save and delete call it for their model."""
    model_ids = [pk for pk in set(model_ids) if pk is not None]
    if not model_ids:
        return
    published = ModelVersion.objects.filter(
        model_id__in=model_ids, status=ModelVersion.Status.PUBLISHED
    )
    facts = {
        row["model_id"]: row
        for row in published.values("model_id").annotate(
            least_gpu=models.Min(
                "min_gpu_memory_gb", filter=Q(serving_runtime__device=ServingRuntime.Device.GPU)
            ),
            least_cpu=models.Min(
                "required_memory_gb", filter=Q(serving_runtime__device=ServingRuntime.Device.CPU)
            ),
        )
    }
    changed = []
    for model in Model.objects.filter(pk__in=model_ids).only(
        "pk", "is_listed", "least_gpu_memory_gb", "least_cpu_memory_gb"
    ):
        row = facts.get(model.pk, {})
        new = (model.pk in facts, row.get("least_gpu"), row.get("least_cpu"))
        if new != (model.is_listed, model.least_gpu_memory_gb, model.least_cpu_memory_gb):
            model.is_listed, model.least_gpu_memory_gb, model.least_cpu_memory_gb = new
            changed.append(model)
    Model.objects.bulk_update(
        changed, ["is_listed", "least_gpu_memory_gb", "least_cpu_memory_gb"], batch_size=500
    )


class ModelArtifact(models.Model):
    """One file of a version's weights folder, with what a download must match."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="artifacts")
    path = models.CharField(max_length=500, help_text="Relative to the version's artifact_uri.")
    size_bytes = models.BigIntegerField(validators=[MinValueValidator(0)])
    sha256 = models.CharField(
        max_length=64, validators=[RegexValidator(r"^[0-9a-f]{64}$", "A hex SHA-256 digest.")]
    )

    class Meta:
        ordering = ["version", "path"]
        constraints = [
            models.UniqueConstraint(fields=["version", "path"], name="unique_artifact_path")
        ]

    def __str__(self):
        return self.path


class TokenPrice(models.Model):
    """Serverless price of a version per million tokens, in force from `effective_from` until
    the next price of the same version starts."""

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="token_prices"
    )
    currency = models.CharField(max_length=3, default="USD", validators=[currency_validator])
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    # Prompt tokens the replica read from its prefix cache (usage.prompt_tokens_details
    # .cached_tokens), as OpenAI, Anthropic and Azure discount them; empty: no discount, cached
    # tokens cost the input price.
    cached_input_per_million = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Price of cached prompt tokens; empty means the input price.",
    )
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_version", "-effective_from", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version", "effective_from"], name="unique_token_price_start"
            ),
            models.CheckConstraint(
                condition=models.Q(cached_input_per_million__isnull=True)
                | models.Q(cached_input_per_million__lte=models.F("input_per_million")),
                name="token_price_cached_at_most_input",
            ),
        ]

    def __str__(self):
        return (
            f"{self.model_version_id}: {self.input_per_million}/{self.output_per_million} "
            f"{self.currency} per 1M from {self.effective_from:%Y-%m-%d}"
        )


class DedicatedPrice(models.Model):
    """Dedicated price of a version on a hardware profile, per replica-hour."""

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="dedicated_prices"
    )
    hardware_profile = models.ForeignKey(
        HardwareProfile, on_delete=models.PROTECT, related_name="dedicated_prices"
    )
    currency = models.CharField(max_length=3, default="USD", validators=[currency_validator])
    per_hour = models.DecimalField(
        max_digits=12, decimal_places=4, validators=[MinValueValidator(0)]
    )
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_version", "hardware_profile", "-effective_from", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version", "hardware_profile", "effective_from"],
                name="unique_dedicated_price_start",
            )
        ]

    def __str__(self):
        return (
            f"{self.model_version_id} on {self.hardware_profile_id}: {self.per_hour} "
            f"{self.currency}/h from {self.effective_from:%Y-%m-%d}"
        )


# --- partner-hosted models ------------------------------------------------------------------


class ProviderConnection(models.Model):
    """Our account with a provider's API (Mistral's, or any OpenAI-compatible one): where to
    send requests, with which credential, and the quota our account has there.

    The credential is stored encrypted (catalog.credentials: Fernet with keys from the
    environment, rotatable) and never leaves the control plane except towards the provider:
    no serializer, form, log line or admin page shows it; `has_credential` is all they know.
    """

    class Kind(models.TextChoices):
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible API"
        MISTRAL = "mistral", "Mistral AI API"

    name = models.SlugField(max_length=64, unique=True, validators=[profile_name_validator])
    display_name = models.CharField(max_length=100)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    base_url = models.URLField(
        max_length=300, help_text="The API root, e.g. https://api.mistral.ai/v1 (http or https)."
    )
    # Fernet token of the API key (bytes as ASCII); "" when no credential was given.
    credential_encrypted = models.TextField(blank=True, editable=False)
    # Our quota with the provider, shared by every organization that calls its models; each
    # organization may use at most `tenant_share_percent` of it (gateway.limits).
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tenant_share_percent = models.PositiveSmallIntegerField(
        default=50,
        validators=[MinValueValidator(1)],
        help_text="The most of the quota one organization may hold at a time, in percent.",
    )
    timeout_seconds = models.PositiveIntegerField(
        default=120, validators=[MinValueValidator(1)], help_text="First byte and idle timeout."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(tenant_share_percent__gte=1) & Q(tenant_share_percent__lte=100),
                name="provider_connection_share_is_a_percentage",
            )
        ]

    def __str__(self):
        return self.name

    def __repr__(self):  # never the credential, even encrypted
        return f"<ProviderConnection {self.name} ({self.kind})>"

    @property
    def has_credential(self) -> bool:
        return bool(self.credential_encrypted)


class ProviderModel(models.Model):
    """Which provider model serves a partner model's version: the kind of API it needs (known
    from the publisher, so the seed can say it), the provider's model id, and the operator's
    connection of that kind (empty until one is chosen: "needs a provider connection")."""

    model_version = models.OneToOneField(
        ModelVersion, on_delete=models.CASCADE, related_name="provider_model"
    )
    kind = models.CharField(max_length=32, choices=ProviderConnection.Kind.choices)
    provider_model_id = models.CharField(
        max_length=200, help_text='The model name the provider expects, e.g. "mistral-large-2411".'
    )
    connection = models.ForeignKey(
        ProviderConnection,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="provider_models",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_version"]

    def __str__(self):
        return f"{self.model_version_id} → {self.provider_model_id}"

    @property
    def needs_connection(self) -> bool:
        connection = self.connection
        return connection is None or not connection.is_active or not connection.has_credential


class ProviderCost(models.Model):
    """What the provider charges us per million tokens of a partner version, in force from
    `effective_from` until the next cost of the same version (effective-dated like TokenPrice,
    which stays what customers pay)."""

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="provider_costs"
    )
    currency = models.CharField(max_length=3, validators=[currency_validator])
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_version", "-effective_from", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version", "effective_from"], name="unique_provider_cost_start"
            )
        ]

    def __str__(self):
        return (
            f"{self.model_version_id}: costs {self.input_per_million}/{self.output_per_million} "
            f"{self.currency} per 1M from {self.effective_from:%Y-%m-%d}"
        )


class TermsOfUse(models.Model):
    """A publisher's terms for a model version, as one versioned document. The terms in force
    are the newest whose `effective_from` has come; a customer must have accepted exactly
    those before enabling or calling the version. Publishers (issue 18) write these too."""

    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="terms")
    version = models.CharField(
        max_length=50,
        validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$", "Use e.g. 2024-11.")],
    )
    title = models.CharField(max_length=200)
    body = models.TextField(help_text="The terms, in Markdown.")
    url = models.URLField(max_length=500, blank=True, help_text="The publisher's own copy.")
    # The terms let the publisher know who its customers are: an organization that accepted
    # them is named in the publisher's analytics and acceptance export (otherwise it is a
    # pseudonym there, see catalog.publishers).
    customers_named = models.BooleanField(
        default=False,
        help_text="Accepting these terms lets the publisher see the customer organization's name.",
    )
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_version", "-effective_from", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version", "version"], name="unique_terms_version"
            )
        ]
        verbose_name_plural = "terms of use"

    def __str__(self):
        return f"{self.title} ({self.version})"


class TermsAcceptance(models.Model):
    """An organization accepted one version of a model version's terms: who, when, which."""

    terms = models.ForeignKey(TermsOfUse, on_delete=models.PROTECT, related_name="acceptances")
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="terms_acceptances"
    )
    accepted_by = models.ForeignKey(
        "accounts.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="terms_acceptances",
    )
    # Who accepted, as the audit log names them (a person, or "API key sk-abc…"): kept when
    # the user is deleted.
    accepted_by_label = models.CharField(max_length=200)
    accepted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-accepted_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["terms", "organization"], name="unique_terms_acceptance"
            )
        ]

    def __str__(self):
        return f"{self.organization_id} accepted {self.terms_id}"


# --- publishers (issue 18) ------------------------------------------------------------------


class Publisher(models.Model):
    """An organization that lists models in the catalog and is paid a share of what customers
    pay for them. Its members propose listings; operators approve them (catalog.publishers)."""

    organization = models.OneToOneField(
        "accounts.Organization", on_delete=models.CASCADE, related_name="publisher"
    )
    display_name = models.CharField(
        max_length=100, help_text="Shown as the models' publisher in the catalog."
    )
    # Stripe idempotency keys derive from this, not from the row id (as BillingAccount.uid).
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The publisher's Stripe Connect account that payouts are transferred to ("" until linked).
    stripe_account_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["display_name"]

    def __str__(self):
        return self.display_name


class Listing(models.Model):
    """A publisher's model in the catalog. The catalog model exists from the first approved
    card on; until then the listing is its proposed slug and the drafts for it."""

    publisher = models.ForeignKey(Publisher, on_delete=models.CASCADE, related_name="listings")
    slug = models.CharField(max_length=100, unique=True, validators=[model_slug_validator])
    model = models.OneToOneField(
        Model, null=True, blank=True, on_delete=models.PROTECT, related_name="listing"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return self.slug


class ListingChange(models.Model):
    """A change a publisher proposes to its listing (the model card, a new version, a price,
    terms of use): a draft its members edit, then submit; an operator approves it (which
    applies it to the catalog through the catalog's services) or asks for changes."""

    class Kind(models.TextChoices):
        CARD = "card", "Model card"
        VERSION = "version", "New version"
        PRICE = "price", "Token price"
        TERMS = "terms", "Terms of use"

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Waiting for review"
        APPROVED = "approved", "Approved"
        CHANGES_REQUESTED = "changes_requested", "Changes requested"
        WITHDRAWN = "withdrawn", "Withdrawn"

    listing = models.ForeignKey(Listing, on_delete=models.CASCADE, related_name="changes")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    created_by_label = models.CharField(max_length=200)
    submitted_at = models.DateTimeField(null=True, blank=True)
    reviewed_at = models.DateTimeField(null=True, blank=True)
    reviewed_by_label = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The review queue: submitted changes, oldest first.
        indexes = [models.Index(fields=["status", "submitted_at"], name="listing_change_queue")]

    def __str__(self):
        return f"{self.listing_id} {self.kind} #{self.pk} ({self.status})"


class ReviewComment(models.Model):
    """A comment on a proposed change, by the publisher or an operator."""

    change = models.ForeignKey(ListingChange, on_delete=models.CASCADE, related_name="comments")
    author_label = models.CharField(max_length=200)
    by_operator = models.BooleanField(default=False)
    body = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.author_label} on change {self.change_id}"


class PrivateOffer(models.Model):
    """One customer organization's own price for a model version: its own rate per million
    tokens (a discount is turned into a rate from the list price when the offer is made) from
    `starts_at` until `expires_at`. Rating uses it in place of the list price while it is in
    force (billing.ledger); usage before its start keeps the price it was rated at. An
    operator's offer is approved as made; a publisher's (for its own models) waits for one."""

    class Status(models.TextChoices):
        PROPOSED = "proposed", "Waiting for approval"
        APPROVED = "approved", "Approved"
        WITHDRAWN = "withdrawn", "Withdrawn"

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="private_offers"
    )
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="private_offers"
    )
    publisher = models.ForeignKey(
        Publisher,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="private_offers",
        help_text="The publisher that proposed it; empty for an operator's offer.",
    )
    currency = models.CharField(max_length=3, validators=[currency_validator])
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    discount_percent = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="The discount the rate was made from, off the list price then; empty for a "
        "rate given as such.",
    )
    # A commitment: the least the customer pays for the model in each billing period the offer
    # is in force (at its rate), prorated for a period it covers in part; the invoice adds the
    # shortfall (billing.invoicing.commitments_for).
    committed_monthly_spend = models.DecimalField(
        max_digits=14,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="The least the customer pays for the model a billing period, in currency.",
    )
    starts_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROPOSED)
    proposed_by_label = models.CharField(max_length=200)
    approved_by_label = models.CharField(max_length=200, blank=True)
    approved_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-starts_at", "-id"]
        # Rating looks offers up per organization and version.
        indexes = [
            models.Index(
                fields=["organization", "model_version", "status"], name="private_offer_lookup"
            )
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(expires_at__isnull=True) | Q(expires_at__gt=models.F("starts_at")),
                name="private_offer_expires_after_start",
            )
        ]

    def __str__(self):
        return f"offer {self.pk}: {self.organization_id} on {self.model_version_id}"
