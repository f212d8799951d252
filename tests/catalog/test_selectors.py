import pytest

from catalog import seeds
from catalog.selectors import model_by_slug, model_list, version_features
from controlplane.errors import NotFound
from tests.catalog.factories import BuiltinRuntimeFactory, ModelFactory, ModelVersionFactory

pytestmark = pytest.mark.django_db


def test_an_organization_sees_public_models_and_its_own_private_ones(
    organization, other_organization
):
    public = ModelVersionFactory().model
    mine = ModelVersionFactory(model=ModelFactory(organization=organization)).model
    theirs = ModelVersionFactory(model=ModelFactory(organization=other_organization)).model
    assert set(model_list(organization=organization)) == {public, mine}
    assert model_by_slug(organization=organization, slug=mine.slug) == mine
    with pytest.raises(NotFound):
        model_by_slug(organization=organization, slug=theirs.slug)


def test_models_without_a_published_version_are_for_operators_only(organization):
    draft = ModelVersionFactory(status="draft").model
    assert list(model_list(organization=organization)) == []
    assert list(model_list(organization=organization, include_unpublished=True)) == [draft]


def test_each_version_lists_the_features_its_runtime_and_flags_give():
    builtin = ModelVersionFactory(serving_runtime=BuiltinRuntimeFactory())
    assert "tool calling: auto, required, named, parallel" in version_features(builtin)
    assert "structured outputs (json_schema, strict)" in version_features(builtin)
    assert {"logprobs", "n choices", "seed"} <= set(version_features(builtin))

    mistral = ModelVersionFactory(runtime_args={"max_model_len": 4096, **seeds.VLLM_MISTRAL_TOOLS})
    assert "tool calling: auto (mistral parser), required, named" in version_features(mistral)
    plain = ModelVersionFactory(
        runtime_args={"max_model_len": 4096, **seeds.VLLM_STRUCTURED_OUTPUTS}
    )
    features = version_features(plain)
    assert "tool calling: required, named (no auto: no tool-call parser)" in features
    assert "JSON mode (json_object)" in features

    embedder = ModelVersionFactory(model=ModelFactory(tasks=["embeddings"]))
    assert version_features(embedder) == ["embeddings"]
