import pytest

from catalog.selectors import model_by_slug, model_list
from controlplane.errors import NotFound
from tests.catalog.factories import ModelFactory, ModelVersionFactory

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
