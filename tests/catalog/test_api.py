"""GET /api/v1/models, /models/{slug}, /hardware-profiles, and the operator endpoints."""

import hashlib
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from accounts.roles import Role
from catalog.models import Model, ModelVersion, TokenPrice
from catalog.permissions import operator_system_actor
from catalog.seeds import ensure_catalog_seeds
from catalog.services import model_version_import
from tests.catalog.factories import (
    BuiltinRuntimeFactory,
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def seeded(db):
    return ensure_catalog_seeds()


def slugs(response):
    assert response.status_code == 200, response.content
    return [item["slug"] for item in response.json()["results"]]


def test_the_seeded_catalog_lists_with_facts_and_from_prices(api, seeded):
    response = api.get("/api/v1/models")
    assert slugs(response) == [
        "bge-m3",
        "mistral-7b-instruct-v0.3",
        "mistral-large",
        "mixtral-8x22b-instruct-v0.1",
        "mixtral-8x7b-instruct-v0.1",
    ]
    item = response.json()["results"][4]
    assert item["hosting"] == "self_hosted"
    partner = response.json()["results"][2]
    assert partner["hosting"] == "partner" and partner["runtimes"] == []
    assert partner["price_from"]["input_per_million"] == "2.400000"
    embedding = response.json()["results"][0]
    assert (embedding["tasks"], embedding["license"]) == (["embeddings"], "MIT")
    assert embedding["price_from"]["output_per_million"] == "0.000000"
    assert item["architecture"] == "moe"
    assert (item["num_experts"], item["experts_per_token"]) == (8, 2)
    assert item["total_parameters"] == 46_700_000_000
    assert item["languages"] == ["en", "fr", "it", "de", "es"]
    assert item["latest_version"] == "v0.1" and item["runtimes"] == ["vllm"]
    assert item["weights_imported"] is False
    assert item["price_from"]["input_per_million"] == "0.700000"
    assert item["price_from"]["currency"] == "USD"


def test_detail_shows_versions_fit_per_profile_with_reasons_and_prices(api, seeded):
    response = api.get("/api/v1/models/mixtral-8x7b-instruct-v0.1")
    assert response.status_code == 200
    body = response.json()
    assert body["description"].startswith("# Mixtral 8x7B")
    assert "<h1>Mixtral 8x7B Instruct v0.1</h1>" in body["description_html"]
    (version,) = body["versions"]
    assert version["weights_imported"] is False and version["files"] == 0
    profiles = {p["name"]: p for p in version["hardware_profiles"]}
    assert profiles["h100-80gb-x2"]["fits"] and profiles["h200-141gb-x1"]["fits"]
    assert profiles["h100-80gb-x2"]["dedicated_price"]["per_hour"] == "7.0000"
    one = profiles["h100-80gb-x1"]
    assert not one["fits"] and one["dedicated_price"] is None
    assert one["reason"] == (
        "needs ≈103 GB (93 GB weights + 10% KV headroom); 1 × 80 GB × 0.90 = 72 GB available"
    )
    assert "needs GPUs" in profiles["cpu-small"]["reason"]
    fitting = [p["fits"] for p in version["hardware_profiles"]]
    assert fitting == sorted(fitting, reverse=True)  # the ones that fit come first
    assert version["token_price"]["output_per_million"] == "0.700000"


def test_model_cards_cannot_carry_scripts(api):
    model = ModelVersionFactory(
        model=ModelFactory(description="Hi <script>alert(1)</script> [x](javascript:alert(1))")
    ).model
    html = api.get(f"/api/v1/models/{model.slug}").json()["description_html"]
    assert "<script" not in html and "javascript:" not in html


def test_search_and_filters(api, seeded):
    assert slugs(api.get("/api/v1/models?q=mixture")) == [
        "mixtral-8x22b-instruct-v0.1",
        "mixtral-8x7b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?q=FUNCTION calling")) == [
        "mistral-7b-instruct-v0.3",
        "mistral-large",
        "mixtral-8x22b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?task=function-calling&min_context=40000")) == [
        "mistral-large",
        "mixtral-8x22b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?hosting=partner")) == ["mistral-large"]
    assert slugs(api.get("/api/v1/models?language=FR&architecture=moe")) == [
        "mixtral-8x22b-instruct-v0.1",
        "mixtral-8x7b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?architecture=dense")) == [
        "bge-m3",
        "mistral-7b-instruct-v0.3",
        "mistral-large",
    ]
    assert slugs(api.get("/api/v1/models?task=embeddings")) == ["bge-m3"]
    assert slugs(api.get("/api/v1/models?publisher=mistral ai&license=apache-2.0&tag=moe")) == [
        "mixtral-8x22b-instruct-v0.1",
        "mixtral-8x7b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?runtime=builtin")) == []
    assert slugs(api.get("/api/v1/models?deployable_on=h100-80gb-x1")) == [
        "bge-m3",
        "mistral-7b-instruct-v0.3",
    ]
    assert slugs(api.get("/api/v1/models?deployable_on=h200-141gb-x1")) == [
        "bge-m3",
        "mistral-7b-instruct-v0.3",
        "mixtral-8x7b-instruct-v0.1",
    ]
    assert slugs(api.get("/api/v1/models?ordering=-total_parameters")) == [
        "mixtral-8x22b-instruct-v0.1",
        "mistral-large",
        "mixtral-8x7b-instruct-v0.1",
        "mistral-7b-instruct-v0.3",
        "bge-m3",
    ]


def test_task_filter_matches_whole_values_only(api):
    ModelVersionFactory(model=ModelFactory(slug="chatty", tags=["chatbot"], tasks=["completion"]))
    assert slugs(api.get("/api/v1/models?task=chat")) == []
    assert slugs(api.get("/api/v1/models?tag=chat")) == []
    assert slugs(api.get("/api/v1/models?tag=chatbot")) == ["chatty"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("publsher=Mistral AI", "publsher"),
        ("publisher=Nobody", "publisher"),
        ("license=WTFPL", "license"),
        ("task=dance", "task"),
        ("language=english", "language"),
        ("architecture=transformer", "architecture"),
        ("min_context=lots", "min_context"),
        ("min_context=0", "min_context"),
        ("runtime=tgi", "runtime"),
        ("deployable_on=tpu-v5", "deployable_on"),
        ("ordering=price", "ordering"),
    ],
)
def test_unknown_filters_values_and_orderings_are_400s_naming_the_field(api, seeded, query, field):
    response = api.get(f"/api/v1/models?{query}")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_private_models_are_seen_by_their_organization_only(
    organization, other_organization, key_client
):
    ModelVersionFactory(model=ModelFactory(slug="ours", organization=organization))
    ModelVersionFactory(model=ModelFactory(slug="theirs", organization=other_organization))
    ModelVersionFactory(model=ModelFactory(slug="public"))
    ours = key_client(organization, Role.VIEWER)
    assert slugs(ours.get("/api/v1/models")) == ["ours", "public"]
    assert ours.get("/api/v1/models/ours").json()["visibility"] == "private"
    hidden = ours.get("/api/v1/models/theirs")
    assert hidden.status_code == 404
    assert "theirs" not in hidden.json()["detail"] or "No model" in hidden.json()["detail"]
    # Its publisher is not even named when a filter value is refused.
    other = ModelFactory(slug="secret", publisher="Secret Lab", organization=other_organization)
    ModelVersionFactory(model=other)
    refused = ours.get("/api/v1/models?publisher=nobody").json()["detail"]
    assert "Secret Lab" not in refused
    assert ours.get("/api/v1/models/theirs/versions").status_code == 404


def test_drafts_are_hidden_from_customers(api):
    draft = ModelVersionFactory(status="draft").model
    assert slugs(api.get("/api/v1/models")) == []
    assert api.get(f"/api/v1/models/{draft.slug}").status_code == 404


def test_hardware_profiles(api, seeded):
    response = api.get("/api/v1/hardware-profiles?device=gpu&ordering=-price_per_hour")
    assert response.status_code == 200
    names = [p["name"] for p in response.json()["results"]]
    assert names[0] == "h100-80gb-x4" and "cpu-small" not in names
    cpu = api.get("/api/v1/hardware-profiles?device=cpu").json()["results"]
    assert [p["name"] for p in cpu] == ["cpu-small"]
    assert cpu[0]["price_per_hour"] == "0.1000" and cpu[0]["gpu_count"] == 0
    h100 = api.get("/api/v1/hardware-profiles?min_gpu_count=4").json()["results"][0]
    assert h100["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert api.get("/api/v1/hardware-profiles?device=tpu").status_code == 400


def test_anonymous_callers_are_refused(db):
    assert APIClient().get("/api/v1/models").status_code == 401


def count_queries(client, path):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, response.content
    return len(queries)


def make_models(count, profile):
    for _ in range(count):
        version = ModelVersionFactory(model=ModelFactory(tags=["moe"]))
        TokenPriceFactory(model_version=version)
        ModelVersionFactory(model=version.model)  # a second published version, no price
        DedicatedPriceFactory(model_version=version, hardware_profile=profile)


def test_the_list_runs_a_constant_number_of_queries(api):
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    path = "/api/v1/models?page_size=100&tag=moe&deployable_on=h100-80gb-x2&publisher=Mistral AI"
    make_models(1, profile)
    few = count_queries(api, path)
    make_models(60, profile)
    assert count_queries(api, path) == few
    assert count_queries(api, "/api/v1/models/" + Model.objects.first().slug) <= 12


# --- operators ------------------------------------------------------------------------------


@pytest.fixture
def operator(db):
    client = APIClient()
    client.force_login(UserFactory(is_staff=True))  # staff: no organization needed
    return client


@pytest.fixture
def platform_admin(key_client):
    return key_client(OrganizationFactory(slug="platform"), Role.ADMIN)


MODEL = {
    "slug": "acme-moe-v1",
    "display_name": "Acme MoE",
    "publisher": "Acme",
    "tasks": ["chat"],
    "languages": ["en", "de"],
    "license": "Apache-2.0",
    "context_length": 8192,
    "architecture": "moe",
    "num_experts": 8,
    "experts_per_token": 2,
    "total_parameters": 10_000_000_000,
    "active_parameters": 3_000_000_000,
    "tags": ["moe"],
    "description": "# Acme",
}


def test_operators_create_version_price_publish_and_deprecate(operator, api, seeded):
    created = operator.post("/api/v1/models", MODEL, format="json")
    assert created.status_code == 201, created.content
    base = "/api/v1/models/acme-moe-v1/versions"
    version = operator.post(
        base,
        {"version": "v1", "serving_runtime": "vllm", "runtime_args": {"max_model_len": 8192}},
        format="json",
    )
    assert version.status_code == 201, version.content
    assert version.json()["status"] == "draft"
    assert version.json()["min_gpu_memory_gb"] == 25  # 20 GB bf16 × 1.1 / 0.9
    assert api.get("/api/v1/models/acme-moe-v1").status_code == 404  # a draft only

    price = operator.post(
        f"{base}/v1/token-prices",
        {"input_per_million": "0.300000", "output_per_million": "0.900000"},
        format="json",
    )
    assert price.status_code == 201, price.content
    dedicated = operator.post(
        f"{base}/v1/dedicated-prices",
        {"hardware_profile": "h100-80gb-x1", "per_hour": "4.2500"},
        format="json",
    )
    assert dedicated.status_code == 201, dedicated.content
    assert operator.post(f"{base}/v1/publish").json()["status"] == "published"

    listed = api.get("/api/v1/models?publisher=acme").json()["results"]
    assert listed[0]["price_from"]["output_per_million"] == "0.900000"
    assert TokenPrice.objects.get(
        model_version__model__slug="acme-moe-v1"
    ).input_per_million == Decimal("0.3")

    patched = operator.patch(base + "/v1", {"dtype": "fp8"}, format="json")
    assert patched.status_code == 409  # published versions do not change
    assert operator.post(f"{base}/v1/deprecate").json()["status"] == "deprecated"
    assert operator.post(f"{base}/v1/publish").status_code == 409
    actions = set(AuditLogEntry.objects.values_list("action", flat=True))
    assert {
        "catalog.model.create",
        "catalog.version.publish",
        "catalog.version.deprecate",
    } <= actions


def test_operator_input_is_checked(operator, seeded):
    bad = operator.post("/api/v1/models", {**MODEL, "experts_per_token": 9}, format="json")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "experts_per_token"
    dense = operator.post("/api/v1/models", {**MODEL, "architecture": "dense"}, format="json")
    assert dense.status_code == 400 and dense.json()["errors"][0]["field"] == "num_experts"
    typo = operator.post("/api/v1/models", {**MODEL, "contxt_length": 1}, format="json")
    assert typo.status_code == 400 and typo.json()["errors"][0]["field"] == "contxt_length"
    taken = operator.post(
        "/api/v1/models", {**MODEL, "slug": "mixtral-8x7b-instruct-v0.1"}, format="json"
    )
    assert taken.status_code == 409
    base = "/api/v1/models/mixtral-8x7b-instruct-v0.1/versions"
    too_long = operator.post(
        base,
        {"version": "v2", "serving_runtime": "vllm", "runtime_args": {"max_model_len": 10**6}},
        format="json",
    )
    assert too_long.status_code == 400 and "max_model_len" in too_long.json()["detail"]
    util = operator.post(
        base,
        {
            "version": "v2",
            "serving_runtime": "vllm",
            "runtime_args": {"gpu_memory_utilization": 1.5},
        },
        format="json",
    )
    assert util.status_code == 400
    flag = operator.post(
        base,
        {"version": "v2", "serving_runtime": "vllm", "runtime_args": {"--Runner": "pooling"}},
        format="json",
    )
    assert flag.status_code == 400 and "--lowercase-with-hyphens" in flag.json()["detail"]
    no_fit = operator.post(
        f"{base}/v0.1/dedicated-prices",
        {"hardware_profile": "h100-80gb-x1", "per_hour": "1.0000"},
        format="json",
    )
    assert no_fit.status_code == 400 and "72 GB available" in no_fit.json()["detail"]
    past = operator.post(
        f"{base}/v0.1/token-prices",
        {
            "input_per_million": "1",
            "output_per_million": "1",
            "effective_from": "2020-01-01T00:00:00Z",
        },
        format="json",
    )
    assert past.status_code == 400 and past.json()["errors"][0]["field"] == "effective_from"
    assert not ModelVersion.objects.filter(version="v2").exists()


def test_platform_admins_are_operators_and_customers_are_not(platform_admin, api, seeded):
    assert platform_admin.post("/api/v1/models", MODEL, format="json").status_code == 201
    refused = api.post("/api/v1/models", {**MODEL, "slug": "x"}, format="json")
    assert refused.status_code == 403
    assert (
        api.post("/api/v1/models/mixtral-8x7b-instruct-v0.1/versions/v0.1/deprecate").status_code
        == 403
    )
    assert (
        api.get("/api/v1/models/mixtral-8x7b-instruct-v0.1/versions/v0.1/artifacts").status_code
        == 403
    )


def test_operators_see_drafts_and_private_models_and_artifact_urls(
    operator, organization, s3_store, tiny_checkpoint
):
    version = ModelVersionFactory(
        model=ModelFactory(slug="private", organization=organization),
        status="draft",
        serving_runtime=BuiltinRuntimeFactory(),
    )
    model_version_import(actor=operator_system_actor(), version=version, source=tiny_checkpoint)
    assert slugs(operator.get("/api/v1/models")) == ["private"]
    response = operator.get(f"/api/v1/models/private/versions/{version.version}/artifacts")
    assert response.status_code == 200
    files = {f["path"]: f for f in response.json()}
    config = files["config.json"]
    downloaded = httpx.get(config["download_url"])
    assert downloaded.content == (tiny_checkpoint / "config.json").read_bytes()
    assert hashlib.sha256(downloaded.content).hexdigest() == config["sha256"]


def test_the_lean_list_item_equals_drfs_own_rendering_of_its_fields(api, seeded):
    from catalog.selectors import model_list_for_api
    from catalog.serializers import ModelListSerializer

    serializer = ModelListSerializer()
    for model in model_list_for_api(organization=None):
        generic = super(ModelListSerializer, serializer).to_representation(model)
        assert serializer.to_representation(model) == dict(generic)


@pytest.mark.parametrize(
    ("q", "limit"),
    [(" ".join(["mixtral"] * 3000), "10 words"), ("x" * 201, "200 characters")],
)
def test_a_search_is_bounded_before_it_is_a_query(api, q, limit):
    response = api.get("/api/v1/models", {"q": q})
    assert response.status_code == 400, response.content[:500]
    assert response["Content-Type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert error["field"] == "q"
    assert limit.split()[0] in error["message"], error
    # At the limits, a search runs.
    assert api.get("/api/v1/models", {"q": " ".join(["a"] * 10)}).status_code == 200
    assert api.get("/api/v1/models", {"q": "a" * 200}).status_code == 200
