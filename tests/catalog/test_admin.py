import pytest
from django.test import Client

from accounts.models import AuditLogEntry
from catalog.models import ModelVersion
from catalog.seeds import ensure_catalog_seeds
from tests.catalog.factories import ModelVersionFactory
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client():
    client = Client()
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def test_every_catalog_admin_page_renders(admin_client):
    ensure_catalog_seeds()
    version = ModelVersion.objects.first()
    for path in (
        "/admin/catalog/model/",
        f"/admin/catalog/model/{version.model_id}/change/",
        "/admin/catalog/model/add/",
        "/admin/catalog/modelversion/",
        f"/admin/catalog/modelversion/{version.pk}/change/",
        "/admin/catalog/hardwareprofile/",
        "/admin/catalog/servingruntime/",
    ):
        assert admin_client.get(path).status_code == 200, path


def test_publish_and_deprecate_actions_go_through_the_services(admin_client):
    draft = ModelVersionFactory(status="draft")
    response = admin_client.post(
        "/admin/catalog/modelversion/",
        {"action": "publish", "_selected_action": [draft.pk]},
        follow=True,
    )
    assert response.status_code == 200
    draft.refresh_from_db()
    assert draft.status == "published" and draft.published_at is not None
    admin_client.post(
        "/admin/catalog/modelversion/", {"action": "deprecate", "_selected_action": [draft.pk]}
    )
    draft.refresh_from_db()
    assert draft.status == "deprecated"
    assert AuditLogEntry.objects.filter(action="catalog.version.deprecate").count() == 1
