"""The catalog a fresh platform starts with: two runtimes, the common GPU shapes and a CPU one,
and Mistral AI's open-weight models with their public facts. Idempotent: what exists is left
as it is (an operator's edits survive a rerun); what is missing is created.

Facts are from the publishers' model cards (Hugging Face `mistralai/*`, Apache-2.0): parameter
counts, context lengths, languages; BAAI's BGE-M3 (`BAAI/bge-m3`, MIT) is the embedding model, for
vLLM's pooling runner. Their weights are not imported here (93 GB and more); the
catalog shows them as "not imported" until `manage.py catalog_import` brings them in. GPU fit
is computed from parameters × bf16 bytes until then.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from django.db import transaction

from catalog import services
from catalog.models import HardwareProfile, Model, ModelVersion, ServingRuntime, TokenPrice
from catalog.permissions import operator_system_actor
from catalog.selectors import profile_fit

# The newest vLLM release on PyPI when this was written (its image tags are v + version).
VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
BUILTIN_IMAGE = "sirocco/runtime:0.1.0"
CPU_PROFILE = "cpu-small"
# Seed prices start at a fixed moment in the past so reruns add nothing and usage of any date
# since has a price.
SEED_PRICES_FROM = datetime(2025, 1, 1, tzinfo=UTC)

RUNTIMES = [
    {
        "name": ServingRuntime.Name.VLLM,
        "display_name": "vLLM (OpenAI-compatible server)",
        "image": VLLM_IMAGE,
        "device": ServingRuntime.Device.GPU,
        "port": 8000,
        "health_path": "/health",
        "readiness_path": "/v1/models",
        # https://docs.vllm.ai/en/stable/configuration/engine_args.html
        "args_template": [
            "--model",
            "{model_path}",
            "--served-model-name",
            "{served_model_name}",
            "--tensor-parallel-size",
            "{gpu_count}",
            "--max-model-len",
            "{max_model_len}",
            "--gpu-memory-utilization",
            "{gpu_memory_utilization}",
            "--enable-prefix-caching",
            "--host",
            "0.0.0.0",  # noqa: S104 - inside the pod; the Service and NetworkPolicy gate it
            "--port",
            "{port}",
        ],
    },
    {
        "name": ServingRuntime.Name.BUILTIN,
        "display_name": "Sirocco builtin runtime (CPU)",
        "image": BUILTIN_IMAGE,
        "device": ServingRuntime.Device.CPU,
        "port": 8000,
        "health_path": "/health",
        "readiness_path": "/v1/models",
        # `python -m runtime serve …` (runtime/__main__.py)
        "args_template": [
            "serve",
            "--model",
            "{model_path}",
            "--served-model-name",
            "{served_model_name}",
            "--max-model-len",
            "{max_model_len}",
            "--device",
            "cpu",
            "--host",
            "0.0.0.0",  # noqa: S104
            "--port",
            "{port}",
        ],
    },
]

_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _gpu(name, *, gpu_model, product_label, count, memory_gb, cpu, ram, price):
    return {
        "name": name,
        "display_name": f"{count} × {gpu_model}",
        "gpu_model": gpu_model,
        "gpu_count": count,
        "gpu_memory_gb": memory_gb,
        "cpu_request": cpu,
        "memory_request": ram,
        # Labels set by NVIDIA GPU feature discovery on GPU nodes.
        "node_selector": {"nvidia.com/gpu.product": product_label},
        "tolerations": _GPU_TOLERATIONS,
        "price_per_hour": Decimal(price),
        "currency": "USD",
    }


HARDWARE_PROFILES = [
    {
        "name": CPU_PROFILE,
        "display_name": "CPU, 2 cores, 4 GiB",
        "gpu_model": "",
        "gpu_count": 0,
        "gpu_memory_gb": 0,
        "cpu_request": "2",
        "memory_request": "4Gi",
        "node_selector": {},
        "tolerations": [],
        "price_per_hour": Decimal("0.1000"),
        "currency": "USD",
    },
    _gpu(
        "l40s-48gb-x2",
        gpu_model="NVIDIA L40S 48GB",
        product_label="NVIDIA-L40S",
        count=2,
        memory_gb=48,
        cpu="16",
        ram="128Gi",
        price="3.2000",
    ),
    _gpu(
        "a100-80gb-x2",
        gpu_model="NVIDIA A100 80GB",
        product_label="NVIDIA-A100-SXM4-80GB",
        count=2,
        memory_gb=80,
        cpu="24",
        ram="240Gi",
        price="4.4000",
    ),
    _gpu(
        "h100-80gb-x1",
        gpu_model="NVIDIA H100 80GB",
        product_label="NVIDIA-H100-80GB-HBM3",
        count=1,
        memory_gb=80,
        cpu="16",
        ram="160Gi",
        price="3.5000",
    ),
    _gpu(
        "h100-80gb-x2",
        gpu_model="NVIDIA H100 80GB",
        product_label="NVIDIA-H100-80GB-HBM3",
        count=2,
        memory_gb=80,
        cpu="32",
        ram="320Gi",
        price="7.0000",
    ),
    _gpu(
        "h100-80gb-x4",
        gpu_model="NVIDIA H100 80GB",
        product_label="NVIDIA-H100-80GB-HBM3",
        count=4,
        memory_gb=80,
        cpu="64",
        ram="640Gi",
        price="14.0000",
    ),
    _gpu(
        "h200-141gb-x1",
        gpu_model="NVIDIA H200 141GB",
        product_label="NVIDIA-H200",
        count=1,
        memory_gb=141,
        cpu="16",
        ram="200Gi",
        price="4.5000",
    ),
]

_MIXTRAL_LANGUAGES = ["en", "fr", "it", "de", "es"]

# vLLM's own structured-output backend for response_format json_schema and for tool calls it
# forces (required, a named function): guidance (llguidance), the library the builtin runtime
# constrains with, so a schema the gateway accepts (runtime/schemas.py) compiles alike on both.
# https://docs.vllm.ai/en/stable/features/structured_outputs.html
VLLM_STRUCTURED_OUTPUTS = {"--structured-outputs-config": '{"backend": "guidance"}'}
# Mistral models whose tokenizer has the tool-call control tokens (v3 and later): vLLM's
# recommended serving (Mistral's own tokenizer, config and weight formats, read from the
# tokenizer.model.v3, params.json and consolidated.safetensors files their repositories ship)
# and automatic tool choice with its mistral tool-call parser.
# https://docs.vllm.ai/en/stable/features/tool_calling.html#mistral-models-mistral
VLLM_MISTRAL_TOOLS = {
    "--tokenizer-mode": "mistral",
    "--config-format": "mistral",
    "--load-format": "mistral",
    "--enable-auto-tool-choice": True,
    "--tool-call-parser": "mistral",
    **VLLM_STRUCTURED_OUTPUTS,
}

MODELS = [
    {
        "slug": "mixtral-8x7b-instruct-v0.1",
        "display_name": "Mixtral 8x7B Instruct v0.1",
        "publisher": "Mistral AI",
        "family": "Mixtral",
        "tasks": ["chat", "completion"],
        "languages": _MIXTRAL_LANGUAGES,
        "license": "Apache-2.0",
        "context_length": 32768,
        "architecture": "moe",
        "num_experts": 8,
        "experts_per_token": 2,
        "total_parameters": 46_700_000_000,
        "active_parameters": 12_900_000_000,
        "tags": ["moe", "instruct", "multilingual"],
        "description": (
            "# Mixtral 8x7B Instruct v0.1\n\n"
            "A sparse mixture-of-experts model from Mistral AI, tuned to follow instructions. "
            "Each layer has 8 feed-forward experts and a router that sends every token to 2 of "
            "them, so a token runs through about 12.9B of the 46.7B parameters: the speed of a "
            "13B dense model with the knowledge of a much larger one.\n\n"
            "| | |\n|---|---|\n"
            "| Parameters | 46.7B total, 12.9B active per token |\n"
            "| Context | 32k tokens |\n"
            "| Languages | English, French, Italian, German, Spanish |\n"
            "| License | Apache 2.0 |\n\n"
            "In bf16 the weights take about 93 GB: two 80 GB GPUs or one H200.\n\n"
            "Source: `mistralai/Mixtral-8x7B-Instruct-v0.1`."
        ),
        # Its v1 tokenizer has no [TOOL_CALLS] token, so vLLM's mistral parser cannot read calls
        # (auto tool choice stays off); forced calls and JSON still go through the backend.
        "version": {
            "version": "v0.1",
            "runtime_args": {"max_model_len": 32768, **VLLM_STRUCTURED_OUTPUTS},
        },
        "token_price": ("0.700000", "0.700000"),
    },
    {
        "slug": "mixtral-8x22b-instruct-v0.1",
        "display_name": "Mixtral 8x22B Instruct v0.1",
        "publisher": "Mistral AI",
        "family": "Mixtral",
        "tasks": ["chat", "completion", "function-calling"],
        "languages": _MIXTRAL_LANGUAGES,
        "license": "Apache-2.0",
        "context_length": 65536,
        "architecture": "moe",
        "num_experts": 8,
        "experts_per_token": 2,
        "total_parameters": 141_000_000_000,
        "active_parameters": 39_000_000_000,
        "tags": ["moe", "instruct", "multilingual", "function-calling"],
        "description": (
            "# Mixtral 8x22B Instruct v0.1\n\n"
            "Mistral AI's larger sparse mixture-of-experts model: 8 experts per layer, 2 per "
            "token, 39B of 141B parameters active. Strong at mathematics and code, fluent in "
            "five European languages, with native function calling.\n\n"
            "| | |\n|---|---|\n"
            "| Parameters | 141B total, 39B active per token |\n"
            "| Context | 64k tokens |\n"
            "| Languages | English, French, Italian, German, Spanish |\n"
            "| License | Apache 2.0 |\n\n"
            "In bf16 the weights take about 282 GB: more than four 80 GB GPUs hold.\n\n"
            "Source: `mistralai/Mixtral-8x22B-Instruct-v0.1`."
        ),
        "version": {
            "version": "v0.1",
            "runtime_args": {"max_model_len": 65536, **VLLM_MISTRAL_TOOLS},
        },
        "token_price": ("2.000000", "6.000000"),
    },
    {
        "slug": "mistral-7b-instruct-v0.3",
        "display_name": "Mistral 7B Instruct v0.3",
        "publisher": "Mistral AI",
        "family": "Mistral",
        "tasks": ["chat", "completion", "function-calling"],
        "languages": ["en"],
        "license": "Apache-2.0",
        "context_length": 32768,
        "architecture": "dense",
        "num_experts": None,
        "experts_per_token": None,
        "total_parameters": 7_250_000_000,
        "active_parameters": 7_250_000_000,
        "tags": ["instruct", "function-calling"],
        "description": (
            "# Mistral 7B Instruct v0.3\n\n"
            "A dense 7.25B-parameter model tuned to follow instructions, with a vocabulary "
            "extended to 32,768 tokens and function calling. Small enough for one GPU.\n\n"
            "| | |\n|---|---|\n"
            "| Parameters | 7.25B (dense) |\n"
            "| Context | 32k tokens |\n"
            "| License | Apache 2.0 |\n\n"
            "Source: `mistralai/Mistral-7B-Instruct-v0.3`."
        ),
        "version": {
            "version": "v0.3",
            "runtime_args": {"max_model_len": 32768, **VLLM_MISTRAL_TOOLS},
        },
        "token_price": ("0.250000", "0.250000"),
    },
    {
        # An open embedding model vLLM documents for its pooling runner
        # (https://docs.vllm.ai/en/latest/models/pooling_models/); facts from the model card.
        "slug": "bge-m3",
        "display_name": "BGE-M3",
        "publisher": "BAAI",
        "family": "BGE",
        "tasks": ["embeddings"],
        "languages": ["en", "zh", "ar", "de", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru"],
        "license": "MIT",
        "context_length": 8192,
        "architecture": "dense",
        "num_experts": None,
        "experts_per_token": None,
        "total_parameters": 568_000_000,
        "active_parameters": 568_000_000,
        "tags": ["embeddings", "multilingual", "retrieval"],
        "description": (
            "# BGE-M3\n\n"
            "A multilingual text embedding model from the Beijing Academy of Artificial "
            "Intelligence, built on XLM-RoBERTa large: one 1,024-dimension dense vector per "
            "input, for retrieval, clustering and semantic search in more than 100 languages, "
            "over inputs of up to 8,192 tokens.\n\n"
            "| | |\n|---|---|\n"
            "| Parameters | 568M (dense encoder) |\n"
            "| Output | 1,024 dimensions, normalised (CLS pooling) |\n"
            "| Context | 8k tokens |\n"
            "| Languages | 100+ |\n"
            "| License | MIT |\n\n"
            "Served by vLLM's pooling runner (`--runner pooling`) on `/v1/embeddings`. It is "
            "not trained for Matryoshka truncation, so `dimensions` is refused.\n\n"
            "Source: `BAAI/bge-m3`."
        ),
        # vLLM's pooling runner: https://docs.vllm.ai/en/latest/models/pooling_models/
        "version": {
            "version": "v1",
            # An encoder attends both ways, so no prefix of its keys and values can be reused:
            # prefix caching off (after the template's --enable-prefix-caching; the last wins).
            "runtime_args": {
                "max_model_len": 8192,
                "--runner": "pooling",
                "--no-enable-prefix-caching": True,
            },
        },
        # Embedding models are priced per input token; they generate none.
        "token_price": ("0.010000", "0.000000"),
    },
]


# Partner-hosted: Mistral AI's flagship through Mistral's own API. Facts from the public model
# card of the same model (https://huggingface.co/mistralai/Mistral-Large-Instruct-2411: 123B
# dense, 128k context, dozens of languages, native function calling; its weights are under the
# Mistral Research License, so commercial serving goes through Mistral's API) and Google's
# partner-model page (https://docs.cloud.google.com/vertex-ai/generative-ai/docs/partner-models/
# mistral/mistral-large: model id mistral-large-2411, released 2024-11-21, 128,000 tokens).
# Mistral's list price for it is $2 / $6 per million input / output tokens (La Plateforme),
# recorded as the provider cost; our price adds 20 %. No credential: it shows "needs a
# provider connection" until an operator adds one (README).
PARTNER_MODELS = [
    {
        "slug": "mistral-large",
        "display_name": "Mistral Large (24.11)",
        "publisher": "Mistral AI",
        "hosting": Model.Hosting.PARTNER,
        "family": "Mistral",
        "tasks": ["chat", "function-calling"],
        "languages": ["en", "fr", "de", "es", "it", "zh", "ja", "ko", "pt", "nl", "pl"],
        "license": "Mistral AI Terms of Service (API)",
        "context_length": 131072,
        "architecture": "dense",
        "num_experts": None,
        "experts_per_token": None,
        "total_parameters": 123_000_000_000,
        "active_parameters": 123_000_000_000,
        "tags": ["instruct", "function-calling", "json-mode", "partner"],
        "description": (
            "# Mistral Large (24.11)\n\n"
            "Mistral AI's flagship model, served by Mistral AI's own API and billed on your "
            "Sirocco invoice per token. A dense 123B-parameter model with strong reasoning, "
            "knowledge and coding, native function calling and JSON output.\n\n"
            "| | |\n|---|---|\n"
            "| Hosted by | Mistral AI (La Plateforme, `mistral-large-2411`) |\n"
            "| Parameters | 123B (dense) |\n"
            "| Context | 128k tokens |\n"
            "| Languages | dozens, including English, French, German, Spanish, Italian, "
            "Chinese, Japanese, Korean, Portuguese, Dutch and Polish |\n"
            "| Function calling | yes (native), JSON output |\n"
            "| Terms | Mistral AI's Terms of Service and Usage Policy, accepted per "
            "organization before first use |\n\n"
            "Your prompts and completions are sent to Mistral AI to be served.\n\n"
            "Sources: [model card](https://huggingface.co/mistralai/Mistral-Large-Instruct-2411), "
            "[Google Cloud partner model page](https://docs.cloud.google.com/vertex-ai/"
            "generative-ai/docs/partner-models/mistral/mistral-large), "
            "[Mistral AI terms](https://mistral.ai/terms)."
        ),
        "version": "24.11",
        "provider": ("mistral", "mistral-large-2411"),
        "token_price": ("2.400000", "7.200000"),
        "provider_cost": ("USD", "2.000000", "6.000000"),
        "terms": {
            "terms_version": "2024-11",
            "title": "Mistral AI Terms of Service for Mistral Large",
            "url": "https://mistral.ai/terms",
            "body": (
                "Mistral Large is provided by Mistral AI and served through Mistral AI's API. "
                "By enabling it, your organization agrees that:\n\n"
                "- your use of the model and its outputs is governed by Mistral AI's Terms of "
                "Service and Usage Policy (https://mistral.ai/terms), which the platform "
                "operator has accepted for its account with Mistral AI;\n"
                "- the prompts and completions of your requests are sent to Mistral AI to be "
                "served;\n"
                "- usage is billed per token on your invoice at the price the catalog shows.\n"
            ),
        },
    },
]


@transaction.atomic
def ensure_runtimes_and_profiles() -> None:
    for fields in RUNTIMES:
        ServingRuntime.objects.get_or_create(name=fields["name"], defaults=fields)
    for fields in HARDWARE_PROFILES:
        if not HardwareProfile.objects.filter(name=fields["name"]).exists():
            profile = HardwareProfile(**fields)
            profile.full_clean()
            profile.save()


@transaction.atomic
def ensure_catalog_seeds() -> list[Model]:
    """Runtimes, profiles, and the public models with a published vLLM version each, a token
    price and a dedicated price on every profile the version fits (the profile's own rate)."""
    ensure_runtimes_and_profiles()
    actor = operator_system_actor()
    profiles = list(HardwareProfile.objects.filter(is_active=True))
    models = []
    for seed in MODELS:
        fields = {k: v for k, v in seed.items() if k not in ("version", "token_price")}
        model = Model.objects.filter(slug=fields["slug"]).first()
        if model is None:
            model = services.model_create(actor=actor, **fields)
        models.append(model)
        version_fields = seed["version"]
        version = model.versions.filter(version=version_fields["version"]).first()
        if version is None:
            version = services.model_version_create(
                actor=actor,
                model=model,
                serving_runtime=ServingRuntime.Name.VLLM,
                dtype=ModelVersion.Dtype.BFLOAT16,
                **version_fields,
            )
            services.model_version_publish(actor=actor, version=version)
        ensure_prices(
            version=version,
            token_price=seed["token_price"],
            profiles=profiles,
            dedicated=lambda profile: profile.price_per_hour,
        )
    models += [ensure_partner_model(seed) for seed in PARTNER_MODELS]
    return models


def ensure_partner_model(seed: dict) -> Model:
    """A partner-hosted model with a published version mapped to its provider model (no
    connection), our price, the provider's cost and the publisher's terms, unless present."""
    from catalog import providers, terms
    from catalog.models import ProviderCost, TermsOfUse

    actor = operator_system_actor()
    extra = ("version", "provider", "token_price", "provider_cost", "terms")
    fields = {k: v for k, v in seed.items() if k not in extra}
    model = Model.objects.filter(slug=fields["slug"]).first()
    if model is None:
        model = services.model_create(actor=actor, **fields)
    version = model.versions.filter(version=seed["version"]).first()
    if version is None:
        version = services.model_version_create(actor=actor, model=model, version=seed["version"])
        kind, provider_model_id = seed["provider"]
        providers.provider_model_set(
            actor=actor, version=version, kind=kind, provider_model_id=provider_model_id
        )
        services.model_version_publish(actor=actor, version=version)
    ensure_prices(version=version, token_price=seed["token_price"], profiles=[], dedicated=None)
    if not ProviderCost.objects.filter(model_version=version).exists():
        currency, cost_in, cost_out = seed["provider_cost"]
        providers.provider_cost_set(
            actor=actor,
            version=version,
            currency=currency,
            input_per_million=Decimal(cost_in),
            output_per_million=Decimal(cost_out),
            effective_from=SEED_PRICES_FROM,
            allow_past=True,
        )
    if not TermsOfUse.objects.filter(model_version=version).exists():
        terms.terms_publish(
            actor=actor, version=version, effective_from=SEED_PRICES_FROM, **seed["terms"]
        )
    return model


def ensure_prices(*, version, token_price, profiles, dedicated) -> None:
    """A token price and a dedicated price per fitting profile, unless the version has some."""
    actor = operator_system_actor()
    if not TokenPrice.objects.filter(model_version=version).exists():
        services.token_price_set(
            actor=actor,
            version=version,
            input_per_million=Decimal(token_price[0]),
            output_per_million=Decimal(token_price[1]),
            effective_from=SEED_PRICES_FROM,
            allow_past=True,
        )
    priced = set(version.dedicated_prices.values_list("hardware_profile_id", flat=True))
    for profile in profiles:
        if profile.pk in priced or not profile_fit(version=version, profile=profile).fits:
            continue
        services.dedicated_price_set(
            actor=actor,
            version=version,
            profile=profile,
            per_hour=dedicated(profile),
            currency=profile.currency,
            effective_from=SEED_PRICES_FROM,
            allow_past=True,
        )
