"""factory_boy factories for the catalog. Other apps' tests import these too.

Defaults describe a small, published, GPU-served dense model that fits every GPU profile; pass
fields to get anything else, e.g. `ModelVersionFactory(serving_runtime=BuiltinRuntimeFactory())`.
"""

from datetime import timedelta
from decimal import Decimal

import factory
from django.utils import timezone

from catalog.models import (
    DedicatedPrice,
    HardwareProfile,
    Model,
    ModelArtifact,
    ModelVersion,
    ServingRuntime,
    TokenPrice,
)


class ServingRuntimeFactory(factory.django.DjangoModelFactory):
    """The vLLM runtime (get_or_create: runtime names are unique)."""

    class Meta:
        model = ServingRuntime
        django_get_or_create = ["name"]

    name = ServingRuntime.Name.VLLM
    display_name = "vLLM"
    image = "vllm/vllm-openai:v0.11.0"
    device = ServingRuntime.Device.GPU
    port = 8000
    health_path = "/health"
    readiness_path = "/v1/models"
    args_template = factory.LazyFunction(
        lambda: [
            "--model",
            "{model_path}",
            "--served-model-name",
            "{served_model_name}",
            "--tensor-parallel-size",
            "{gpu_count}",
        ]
    )


class BuiltinRuntimeFactory(ServingRuntimeFactory):
    name = ServingRuntime.Name.BUILTIN
    display_name = "Sirocco builtin runtime"
    image = "sirocco/runtime:0.1.0"
    device = ServingRuntime.Device.CPU
    args_template = factory.LazyFunction(
        lambda: ["serve", "--model", "{model_path}", "--port", "{port}"]
    )


class HardwareProfileFactory(factory.django.DjangoModelFactory):
    """One H100 80GB by default."""

    class Meta:
        model = HardwareProfile

    name = factory.Sequence(lambda n: f"gpu-profile-{n}")
    display_name = factory.LazyAttribute(lambda p: p.name)
    gpu_model = "NVIDIA H100 80GB"
    gpu_count = 1
    gpu_memory_gb = 80
    cpu_request = "16"
    memory_request = "128Gi"
    node_selector = factory.LazyFunction(lambda: {"nvidia.com/gpu.product": "NVIDIA-H100-80GB"})
    tolerations = factory.LazyFunction(
        lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    price_per_hour = Decimal("4.0000")
    currency = "USD"
    is_active = True


class CpuProfileFactory(HardwareProfileFactory):
    name = factory.Sequence(lambda n: f"cpu-profile-{n}")
    gpu_model = ""
    gpu_count = 0
    gpu_memory_gb = 0
    cpu_request = "2"
    memory_request = "4Gi"
    node_selector = factory.LazyFunction(dict)
    tolerations = factory.LazyFunction(list)
    price_per_hour = Decimal("0.1000")


class ModelFactory(factory.django.DjangoModelFactory):
    """A public 7B dense chat model."""

    class Meta:
        model = Model

    slug = factory.Sequence(lambda n: f"model-{n}")
    display_name = factory.Sequence(lambda n: f"Model {n}")
    publisher = "Mistral AI"
    family = "Mistral"
    description = "A test model.\n\nIt answers questions."
    tasks = factory.LazyFunction(lambda: ["chat", "completion"])
    languages = factory.LazyFunction(lambda: ["en"])
    license = "Apache-2.0"
    context_length = 32768
    architecture = Model.Architecture.DENSE
    num_experts = None
    experts_per_token = None
    total_parameters = 7_000_000_000
    active_parameters = 7_000_000_000
    tags = factory.LazyFunction(list)
    organization = None
    # Pass organization=... for a model private to that organization.
    visibility = factory.LazyAttribute(
        lambda m: Model.Visibility.PRIVATE if m.organization else Model.Visibility.PUBLIC
    )

    class Params:
        moe = factory.Trait(
            architecture=Model.Architecture.MOE,
            num_experts=8,
            experts_per_token=2,
            total_parameters=46_700_000_000,
            active_parameters=12_900_000_000,
        )


class ModelVersionFactory(factory.django.DjangoModelFactory):
    """A published bf16 safetensors version served by vLLM."""

    class Meta:
        model = ModelVersion

    model = factory.SubFactory(ModelFactory)
    version = factory.Sequence(lambda n: f"v{n}")
    status = ModelVersion.Status.PUBLISHED
    weights_format = ModelVersion.WeightsFormat.SAFETENSORS
    dtype = ModelVersion.Dtype.BFLOAT16
    size_bytes = 0
    serving_runtime = factory.SubFactory(ServingRuntimeFactory)
    runtime_args = factory.LazyFunction(
        lambda: {"max_model_len": 32768, "gpu_memory_utilization": 0.9}
    )
    artifact_uri = ""
    published_at = factory.LazyAttribute(
        lambda v: timezone.now() if v.status == ModelVersion.Status.PUBLISHED else None
    )


class ModelArtifactFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelArtifact

    version = factory.SubFactory(ModelVersionFactory)
    path = factory.Sequence(lambda n: f"model-{n:05d}.safetensors")
    size_bytes = 1024
    sha256 = "0" * 64


class TokenPriceFactory(factory.django.DjangoModelFactory):
    """In force since yesterday: $0.70 in / $0.70 out per million tokens."""

    class Meta:
        model = TokenPrice

    model_version = factory.SubFactory(ModelVersionFactory)
    currency = "USD"
    input_per_million = Decimal("0.700000")
    output_per_million = Decimal("0.700000")
    effective_from = factory.LazyFunction(lambda: timezone.now() - timedelta(days=1))


class DedicatedPriceFactory(factory.django.DjangoModelFactory):
    """In force since yesterday: $5/h."""

    class Meta:
        model = DedicatedPrice

    model_version = factory.SubFactory(ModelVersionFactory)
    hardware_profile = factory.SubFactory(HardwareProfileFactory)
    currency = "USD"
    per_hour = Decimal("5.0000")
    effective_from = factory.LazyFunction(lambda: timezone.now() - timedelta(days=1))
