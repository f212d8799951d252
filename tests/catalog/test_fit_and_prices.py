"""Compatibility is computed from weights and profile memory; prices are effective-dated."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from catalog.models import ModelVersion
from catalog.selectors import (
    dedicated_price_at,
    profile_fit,
    token_price_at,
    token_price_ceiling,
)
from tests.catalog.factories import (
    BuiltinRuntimeFactory,
    CpuProfileFactory,
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def mixtral_8x7b():
    model = ModelFactory(slug="mixtral-8x7b-instruct-v0.1", moe=True)
    return ModelVersionFactory(model=model, version="v0.1", dtype="bfloat16", size_bytes=0)


@pytest.fixture
def profiles():
    return {
        "h100-80gb-x1": HardwareProfileFactory(name="h100-80gb-x1", gpu_count=1),
        "h100-80gb-x2": HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2),
        "h200-141gb-x1": HardwareProfileFactory(
            name="h200-141gb-x1", gpu_model="NVIDIA H200", gpu_memory_gb=141
        ),
    }


def test_mixtral_8x7b_in_bf16_fits_two_h100s_and_one_h200_not_one_h100(mixtral_8x7b, profiles):
    one_h100 = profile_fit(version=mixtral_8x7b, profile=profiles["h100-80gb-x1"])
    assert not one_h100.fits
    assert one_h100.required_gb == Decimal("102.74")  # 46.7e9 × 2 bytes × 1.10
    assert one_h100.available_gb == Decimal("72.00")
    assert one_h100.reason == (
        "needs ≈103 GB (93 GB weights + 10% KV headroom); 1 × 80 GB × 0.90 = 72 GB available"
    )
    two_h100 = profile_fit(version=mixtral_8x7b, profile=profiles["h100-80gb-x2"])
    assert two_h100.fits and two_h100.available_gb == Decimal("144.00")
    assert two_h100.reason.startswith("fits: needs ≈103 GB")
    assert profile_fit(version=mixtral_8x7b, profile=profiles["h200-141gb-x1"]).fits
    assert mixtral_8x7b.min_gpu_memory_gb == 115  # ceil(102.74 / 0.9)


def test_size_of_imported_weights_wins_over_parameter_count(mixtral_8x7b, profiles):
    mixtral_8x7b.size_bytes = 60 * 10**9  # e.g. a quantised build
    mixtral_8x7b.save()
    assert mixtral_8x7b.required_memory_gb == Decimal("66.00")
    assert profile_fit(version=mixtral_8x7b, profile=profiles["h100-80gb-x1"]).fits


def test_a_lower_gpu_memory_utilization_shrinks_what_is_available(profiles):
    version = ModelVersionFactory(
        size_bytes=60 * 10**9, runtime_args={"gpu_memory_utilization": 0.8}
    )
    fit = profile_fit(version=version, profile=profiles["h100-80gb-x1"])
    assert not fit.fits
    assert fit.reason.endswith("1 × 80 GB × 0.80 = 64 GB available")
    assert version.min_gpu_memory_gb == 83  # ceil(66 / 0.8)


def test_cpu_profiles_take_the_builtin_runtime_when_the_weights_fit_the_memory_request():
    tiny = ModelVersionFactory(
        serving_runtime=BuiltinRuntimeFactory(), dtype="float32", size_bytes=14_000_000
    )
    cpu = CpuProfileFactory(memory_request="4Gi")
    assert profile_fit(version=tiny, profile=cpu).fits
    gpu = HardwareProfileFactory()
    on_gpu = profile_fit(version=tiny, profile=gpu)
    assert not on_gpu.fits and "runs on CPU" in on_gpu.reason

    big = ModelVersionFactory(serving_runtime=BuiltinRuntimeFactory(), size_bytes=8 * 10**9)
    too_big = profile_fit(version=big, profile=cpu)
    assert not too_big.fits
    assert too_big.reason.startswith("needs ≈8.8 GB (8.0 GB weights + 10% KV headroom); 4Gi")
    vllm_on_cpu = profile_fit(version=ModelVersionFactory(), profile=cpu)
    assert not vllm_on_cpu.fits and "needs GPUs" in vllm_on_cpu.reason


def test_token_price_in_force_is_the_latest_started():
    version = ModelVersionFactory()
    now = timezone.now()
    old = TokenPriceFactory(model_version=version, effective_from=now - timedelta(days=30))
    new = TokenPriceFactory(
        model_version=version,
        effective_from=now - timedelta(days=1),
        input_per_million=Decimal("0.5"),
    )
    TokenPriceFactory(model_version=version, effective_from=now + timedelta(days=5))
    assert token_price_at(version=version, at=now) == new
    assert token_price_at(version=version, at=now - timedelta(days=2)) == old
    assert token_price_at(version=version, at=now - timedelta(days=31)) is None
    assert isinstance(new.input_per_million, Decimal)


def test_dedicated_price_is_per_profile():
    version = ModelVersionFactory()
    a, b = HardwareProfileFactory(), HardwareProfileFactory(gpu_count=2)
    price_a = DedicatedPriceFactory(model_version=version, hardware_profile=a)
    now = timezone.now()
    assert dedicated_price_at(version=version, profile=a, at=now) == price_a
    assert dedicated_price_at(version=version, profile=b, at=now) is None


def test_served_model_name_defaults_to_the_model_slug():
    version = ModelVersionFactory(model=ModelFactory(slug="mistral-7b"))
    assert version.served_model_name == "mistral-7b"
    assert ModelVersion.objects.get(pk=version.pk).served_model_name == "mistral-7b"


def test_model_listing_columns_follow_every_version_change():
    from catalog.models import Model
    from catalog.selectors import model_list, models_deployable_on

    model = ModelFactory()
    h100 = HardwareProfileFactory(gpu_count=1)
    cpu = CpuProfileFactory(memory_request="4Gi")

    def fits(profile):
        return list(models_deployable_on(Model.objects.filter(pk=model.pk), profile)) == [model]

    big = ModelVersionFactory(model=model, status="draft", size_bytes=100 * 10**9)
    model.refresh_from_db()
    assert not model.is_listed and not fits(h100)
    big.status = "published"
    big.save(update_fields=["status"])
    assert list(model_list(organization=None)) == [model] and not fits(h100)
    small = ModelVersionFactory(model=model, size_bytes=10 * 10**9)
    assert fits(h100) and not fits(cpu)
    tiny = ModelVersionFactory(
        model=model, serving_runtime=BuiltinRuntimeFactory(), size_bytes=10**6
    )
    assert fits(cpu)
    tiny.delete()
    small.status = "deprecated"
    small.save()
    assert not fits(cpu) and not fits(h100)
    big.delete()
    model.refresh_from_db()
    assert not model.is_listed and list(model_list(organization=None)) == []


def test_deployable_on_agrees_with_profile_fit_for_many_shapes():
    import random

    from catalog.models import Model
    from catalog.selectors import models_deployable_on

    rng = random.Random(7)
    profiles = [
        HardwareProfileFactory(gpu_count=count, gpu_memory_gb=memory)
        for count, memory in ((1, 24), (1, 80), (2, 80), (4, 80), (1, 141))
    ] + [CpuProfileFactory(memory_request="4Gi"), CpuProfileFactory(memory_request="64Gi")]
    builtin = BuiltinRuntimeFactory()
    for _ in range(30):
        model = ModelFactory()
        for _ in range(rng.randint(1, 3)):
            ModelVersionFactory(
                model=model,
                status=rng.choice(["draft", "published", "published", "deprecated"]),
                size_bytes=rng.choice([0, 10**6, 15 * 10**9, 70 * 10**9, 93 * 10**9, 300 * 10**9]),
                runtime_args={"gpu_memory_utilization": rng.choice([0.8, 0.9, 0.95])},
                **({"serving_runtime": builtin} if rng.random() < 0.3 else {}),
            )
    for profile in profiles:
        in_sql = set(models_deployable_on(Model.objects.all(), profile))
        in_python = {
            m
            for m in Model.objects.all()
            if any(
                profile_fit(version=v, profile=profile).fits
                for v in m.versions.filter(status="published")
            )
        }
        assert in_sql == in_python, profile.name


def test_the_price_ceiling_covers_a_raise_within_the_horizon():
    """What the gateway holds spend at: the highest price in force from now to now + horizon."""
    version = ModelVersionFactory()
    now = timezone.now()
    TokenPriceFactory(model_version=version, effective_from=now - timedelta(days=30))
    TokenPriceFactory(
        model_version=version,
        effective_from=now - timedelta(days=1),
        input_per_million=Decimal("0.5"),
        output_per_million=Decimal("2"),
    )
    hour = timedelta(hours=1)
    ceiling = token_price_ceiling(version_id=version.pk, now=now, horizon=hour)
    assert ceiling == (Decimal("0.5"), Decimal("2"), "USD")
    TokenPriceFactory(
        model_version=version,
        effective_from=now + timedelta(minutes=30),
        input_per_million=Decimal("0.9"),
        output_per_million=Decimal("1"),
    )
    TokenPriceFactory(
        model_version=version, effective_from=now + timedelta(days=2), input_per_million=9
    )
    ceiling = token_price_ceiling(version_id=version.pk, now=now, horizon=hour)
    assert ceiling == (Decimal("0.9"), Decimal("2"), "USD")  # the raise, and today's output
    assert token_price_ceiling(version_id=ModelVersionFactory().pk, now=now, horizon=hour) is None
