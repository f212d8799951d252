"""Will a model version fit a hardware profile? Computed, never hand-set.

The rule (documented in docs/architecture.md):

* weights = the version's size in bytes, or, until its weights are imported, total parameters ×
  bytes per parameter of its dtype;
* required = weights × (1 + KV_HEADROOM): room for the KV cache and activations;
* a GPU profile offers gpu_count × gpu_memory_gb × gpu_memory_utilization (the version's
  `runtime_args["gpu_memory_utilization"]`, else 0.90, vLLM's default), and needs a GPU runtime;
* a CPU profile offers its memory request, and needs a CPU runtime (the builtin one).

GB here are 10^9 bytes. `required_memory_gb` and `min_gpu_memory_gb` are stored on the version
(ModelVersion.save) so the list endpoint filters "deployable on a profile" in SQL; `profile_fit`
decides with the same numbers, so the API and the filter never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation

KV_HEADROOM = Decimal("0.10")
DEFAULT_GPU_MEMORY_UTILIZATION = Decimal("0.90")
BYTES_PER_GB = Decimal(10**9)

BYTES_PER_PARAMETER = {
    "float32": Decimal(4),
    "bfloat16": Decimal(2),
    "float16": Decimal(2),
    "fp8": Decimal(1),
    "int8": Decimal(1),
    "int4": Decimal("0.5"),
}


@dataclass(frozen=True)
class Fit:
    fits: bool
    reason: str
    required_gb: Decimal
    available_gb: Decimal


@dataclass(frozen=True)
class Requirements:
    weights_gb: Decimal
    required_gb: Decimal  # weights plus headroom, rounded up to 0.01 GB
    gpu_memory_utilization: Decimal
    min_gpu_memory_gb: int  # least gpu_count × gpu_memory_gb that holds `required_gb`


def quantity_to_bytes(quantity: str) -> Decimal:
    """A Kubernetes memory quantity ("128Gi", "64G", "512Mi") in bytes."""
    from kubernetes.utils.quantity import parse_quantity

    try:
        value = parse_quantity(quantity)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{quantity!r} is not a Kubernetes quantity; use e.g. 128Gi, 64G or 512Mi."
        ) from error
    if value <= 0:
        raise ValueError(f"{quantity!r} must be more than zero.")
    return value


def gpu_memory_utilization(runtime_args: dict | None) -> Decimal:
    raw = (runtime_args or {}).get("gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION)
    try:
        value = Decimal(str(raw))
    except InvalidOperation as error:
        raise ValueError("gpu_memory_utilization must be a number between 0 and 1.") from error
    if not Decimal(0) < value <= Decimal(1):
        raise ValueError("gpu_memory_utilization must be more than 0 and at most 1.")
    return value


def weights_bytes(*, size_bytes: int, total_parameters: int, dtype: str) -> Decimal:
    if size_bytes:
        return Decimal(size_bytes)
    return Decimal(total_parameters) * BYTES_PER_PARAMETER[dtype]


def version_requirements(version) -> Requirements:
    weights = weights_bytes(
        size_bytes=version.size_bytes,
        total_parameters=version.model.total_parameters,
        dtype=version.dtype,
    )
    weights_gb = weights / BYTES_PER_GB
    required_gb = (weights_gb * (1 + KV_HEADROOM)).quantize(Decimal("0.01"), ROUND_CEILING)
    utilization = gpu_memory_utilization(version.runtime_args)
    return Requirements(
        weights_gb=weights_gb,
        required_gb=required_gb,
        gpu_memory_utilization=utilization,
        # required ≤ N × u  ⇔  N ≥ required / u  ⇔  N ≥ ceil(required / u), for whole-GB N.
        min_gpu_memory_gb=math.ceil(required_gb / utilization),
    )


def profile_memory_gb(profile) -> Decimal:
    """Memory a CPU profile's replica may use, in GB."""
    return quantity_to_bytes(profile.memory_request) / BYTES_PER_GB


def fit(*, version, profile) -> Fit:
    requirements = version_requirements(version)
    required = requirements.required_gb
    needs = (
        f"needs ≈{format_gb(required)} ({format_gb(requirements.weights_gb)} weights + "
        f"{KV_HEADROOM:.0%} KV headroom)"
    )
    if version.serving_runtime is None:  # a partner model's version: its provider serves it
        return Fit(
            False, "served by its provider's API: no hardware to choose", required, Decimal(0)
        )
    device = version.serving_runtime.device
    if profile.gpu_count == 0:
        available = profile_memory_gb(profile)
        if device != "cpu":
            return Fit(
                False,
                f"the {version.serving_runtime.name} runtime needs GPUs; {profile.name} has none",
                required,
                available,
            )
        offers = f"{profile.memory_request} memory request = {format_gb(available)} available"
        fits = required <= available
    else:
        utilization = requirements.gpu_memory_utilization
        available = profile.gpu_count * profile.gpu_memory_gb * utilization
        if device != "gpu":
            return Fit(
                False,
                f"the {version.serving_runtime.name} runtime runs on CPU; choose a CPU profile",
                required,
                available,
            )
        offers = (
            f"{profile.gpu_count} × {profile.gpu_memory_gb} GB × {utilization:.2f} = "
            f"{format_gb(available)} available"
        )
        fits = profile.total_gpu_memory_gb >= requirements.min_gpu_memory_gb
    reason = f"{needs}; {offers}"
    return Fit(fits, reason if not fits else f"fits: {reason}", required, available)


def format_gb(value: Decimal) -> str:
    """93.4 → "93 GB", 4.51 → "4.5 GB", 0.016 → "16 MB": as precise as a reader needs."""
    if value >= 10:
        return f"{value.quantize(Decimal(1))} GB"
    if value >= 1:
        return f"{value.quantize(Decimal('0.1'))} GB"
    return f"{(value * 1000).quantize(Decimal(1))} MB"
