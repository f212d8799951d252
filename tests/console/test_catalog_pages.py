from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.roles import Role
from catalog.models import Model
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


def mixtral():
    model = ModelFactory(
        slug="mixtral-8x7b-instruct",
        display_name="Mixtral 8x7B Instruct",
        moe=True,
        languages=["en", "fr", "de", "es", "it"],
        context_length=32768,
        description="# Mixtral\n\nA **sparse** mixture of experts.<script>alert(1)</script>",
        tags=["moe"],
    )
    version = ModelVersionFactory(model=model, version="v0.1")
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.70"),
        output_per_million=Decimal("0.70"),
    )
    return model, version


def test_the_catalog_lists_models_with_context_languages_and_price(console, organization):
    mixtral()
    ModelVersionFactory(model=ModelFactory(display_name="Small Model", languages=["ja"]))
    body = console(organization, Role.VIEWER).get("/models/").content.decode()
    assert "Mixtral 8x7B Instruct" in body and "Small Model" in body
    assert "33k tokens" in body
    assert "English, French, German, Spanish, Italian" in body
    assert "$0.70 in · $0.70 out" in body
    assert "dedicated only" in body  # the small model has no per-token price


def test_searching_and_filtering_the_catalog(console, organization):
    mixtral()
    ModelVersionFactory(
        model=ModelFactory(
            display_name="Tiny CPU", total_parameters=10**9, active_parameters=10**9
        ),
        serving_runtime=BuiltinRuntimeFactory(),
    )
    ModelVersionFactory(model=ModelFactory(display_name="Coder", license="MIT", languages=["fr"]))
    client = console(organization, Role.VIEWER)

    def names(query):
        response = client.get("/models/", query)
        assert response.status_code == 200, response.content
        return {model.display_name for model, _price in response.context["rows"]}

    assert names({"q": "MIXTRAL"}) == {"Mixtral 8x7B Instruct"}
    assert names({"language": "fr"}) == {"Mixtral 8x7B Instruct", "Coder"}
    assert names({"license": "MIT"}) == {"Coder"}
    assert names({"size": "small"}) == {"Tiny CPU", "Coder"}
    assert names({"size": "medium"}) == {"Mixtral 8x7B Instruct"}
    assert names({"runtime": "builtin"}) == {"Tiny CPU"}
    assert names({"task": "chat", "q": "coder"}) == {"Coder"}
    assert names({"q": "nothing-like-this"}) == set()


def test_a_bad_filter_says_what_to_fix_and_keeps_the_search(console, organization):
    mixtral()
    response = console(organization).get("/models/", {"q": "mixtral", "size": "huge"})
    assert response.status_code == 400
    assert "size" in response.context["form"].errors
    assert 'value="mixtral"' in response.content.decode()


def test_another_organizations_private_model_is_invisible(
    console, organization, other_organization
):
    theirs = ModelVersionFactory(model=ModelFactory(organization=other_organization)).model
    mine = ModelVersionFactory(model=ModelFactory(organization=organization)).model
    client = console(organization)
    body = client.get("/models/").content.decode()
    assert mine.display_name in body and theirs.display_name not in body
    assert client.get(f"/models/{theirs.slug}/").status_code == 404
    assert client.get(f"/models/{mine.slug}/").status_code == 200


def test_the_model_page_shows_card_versions_and_hardware(console, organization):
    model, version = mixtral()
    h100 = HardwareProfileFactory(name="h100-80gb-x2", display_name="2 × H100", gpu_count=2)
    HardwareProfileFactory(name="l4-24gb", display_name="1 × L4", gpu_memory_gb=24)
    CpuProfileFactory(name="cpu-small")
    DedicatedPriceFactory(model_version=version, hardware_profile=h100, per_hour=Decimal("8"))
    old = ModelVersionFactory(model=model, version="v0.0", status="deprecated")
    response = console(organization, Role.DEVELOPER).get(f"/models/{model.slug}/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "<strong>sparse</strong>" in body and "<script>alert" not in body
    assert [o.profile for o in response.context["fitting"]] == [h100]
    assert "$8.00" in body and "$5,840.00" in body  # per hour, and 730 hours of it
    not_fitting = {o.profile.name: o for o in response.context["not_fitting"]}
    assert set(not_fitting) == {"l4-24gb", "cpu-small"}
    assert "needs ≈" in body and "runtime needs GPUs" in body
    assert old.version in body
    assert f'href="/models/{model.slug}/deploy?version=v0.1"' in body


def test_viewers_get_no_deploy_button(console, organization):
    model, _ = mixtral()
    body = console(organization, Role.VIEWER).get(f"/models/{model.slug}/").content.decode()
    assert f"/models/{model.slug}/deploy" not in body


def test_unknown_model_or_version_is_a_404(console, organization):
    model, _ = mixtral()
    client = console(organization)
    assert client.get("/models/no-such-model/").status_code == 404
    assert client.get(f"/models/{model.slug}/?version=v9").status_code == 404


def test_catalog_pages_run_a_constant_number_of_queries(console, organization):
    client = console(organization, Role.VIEWER)
    profiles = [HardwareProfileFactory() for _ in range(2)]

    def count(path):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(path).status_code == 200
        return len(queries)

    model, version = mixtral()
    DedicatedPriceFactory(model_version=version, hardware_profile=profiles[0])
    few = count("/models/"), count(f"/models/{model.slug}/")
    for _ in range(30):
        other = ModelVersionFactory(model=ModelFactory(architecture=Model.Architecture.DENSE))
        TokenPriceFactory(model_version=other)
    for _ in range(5):
        extra = ModelVersionFactory(model=model)
        TokenPriceFactory(model_version=extra)
        for profile in profiles:
            DedicatedPriceFactory(model_version=extra, hardware_profile=profile)
        HardwareProfileFactory()
    assert (count("/models/"), count(f"/models/{model.slug}/")) == few


def test_the_filter_form_offers_the_console_s_filters_with_labels(console, organization):
    mixtral()
    response = console(organization).get("/models/")
    form = response.context["form"]
    assert list(form.fields) == [
        "q",
        "task",
        "language",
        "license",
        "size",
        "runtime",
        "deployable_on",
    ]
    body = response.content.decode()
    assert "[invalid name]" not in body
    assert ">Fits hardware<" in body and ">Search<" in body


def test_a_search_too_long_for_the_catalog_says_the_limit(console, organization):
    mixtral()
    response = console(organization).get("/models/", {"q": " ".join(["mixtral"] * 3000)})
    assert response.status_code == 400
    assert "at most 10 words" in " ".join(response.context["form"].errors["q"])
    response = console(organization).get("/models/", {"q": "x" * 201})
    assert response.status_code == 400
    assert "200 characters" in " ".join(response.context["form"].errors["q"])
