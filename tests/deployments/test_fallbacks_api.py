"""REST: a deployment's `fallbacks` on create and PATCH — ordered, tenant-scoped (another
organization's deployment is unknown, exactly like a name nobody has), no cycles, bounded,
callable targets only, audited; the route the gateway reads carries them."""

import pytest

from accounts.models import AuditLogEntry
from deployments.models import Deployment, DeploymentEvent, Fallback
from deployments.selectors import route_for
from tests.deployments.factories import DeploymentFactory
from tests.deployments.test_api import URL, catalog, create  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db


@pytest.fixture
def targets(organization):
    return [DeploymentFactory(organization=organization, name=n) for n in ("spare", "other")]


def patch(api, deployment, **body):
    return api.patch(f"{URL}/{deployment.pk}", body, format="json")


def test_fallbacks_are_set_in_order_shown_and_routed(api, catalog, targets):  # noqa: F811
    response = create(api, fallbacks=["other", "spare"])
    assert response.status_code == 201, response.json()
    assert [f["name"] for f in response.json()["fallbacks"]] == ["other", "spare"]
    deployment = Deployment.objects.get(name="chat")
    route = route_for(organization_id=deployment.organization_id, model="chat")
    assert route.fallbacks == ("other", "spare")

    response = patch(api, deployment, fallbacks=["spare"])
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["fallbacks"] == [{"name": "spare", "model": targets[0].model_version.model.slug,
                                  "status": "ready"}]  # fmt: skip
    assert body["generation"] == 1  # not a new spec: nothing to reconcile
    entry = AuditLogEntry.objects.filter(action="deployment.update").get()
    assert entry.changes == {"fallbacks": [["other", "spare"], ["spare"]]}
    assert DeploymentEvent.objects.filter(deployment=deployment, reason="FallbacksChanged").exists()

    assert patch(api, deployment, fallbacks=[]).status_code == 200
    assert not Fallback.objects.exists()


def test_another_organizations_deployment_is_unknown(api, catalog, other_organization):  # noqa: F811
    DeploymentFactory(organization=other_organization, name="theirs")
    response = create(api, fallbacks=["theirs"])
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "unknown_fallback"
    nobody = create(api, fallbacks=["nobody"]).json()
    # Word for word what a name nobody has gets (but the name): nothing says it exists.
    assert body["detail"].replace("theirs", "X") == nobody["detail"].replace("nobody", "X")
    assert not Deployment.objects.filter(name="chat").exists()


def test_cycles_are_refused(api, catalog, targets):  # noqa: F811
    spare, other = targets
    assert patch(api, spare, fallbacks=["other"]).status_code == 200
    response = patch(api, other, fallbacks=["spare"])
    assert (response.status_code, response.json()["code"]) == (400, "fallback_cycle")
    response = patch(api, spare, fallbacks=["spare"])
    assert (response.status_code, response.json()["code"]) == (400, "fallback_cycle")
    assert list(Fallback.objects.values_list("deployment__name", "target__name")) == [
        ("spare", "other")
    ]


@pytest.mark.parametrize(
    "status", [Deployment.Status.FAILED, Deployment.Status.DELETING, Deployment.Status.DELETED]
)
def test_a_target_that_cannot_serve_is_refused(api, catalog, organization, status):  # noqa: F811
    DeploymentFactory(organization=organization, name="gone", status=status)
    response = create(api, fallbacks=["gone"])
    assert response.status_code == 400
    expected = "unknown_fallback" if status == Deployment.Status.DELETED else "fallback_not_enabled"
    assert response.json()["code"] == expected


def test_the_list_is_bounded_and_has_no_repeats(api, catalog, organization, settings):  # noqa: F811
    settings.DEPLOYMENTS_MAX_FALLBACKS = 2
    for name in ("a", "b", "c"):
        DeploymentFactory(organization=organization, name=name)
    response = create(api, fallbacks=["a", "b", "c"])
    assert response.status_code == 400 and "at most 2" in response.json()["detail"]
    response = create(api, fallbacks=["a", "a"])
    assert response.status_code == 400 and "twice" in response.json()["detail"]


def test_a_partner_entry_or_serverless_deployment_takes_fallbacks(api, organization, targets):
    serverless = DeploymentFactory(
        organization=organization, name="entry", type="serverless", hardware_profile=None
    )
    response = patch(api, serverless, fallbacks=["spare"])
    assert response.status_code == 200, response.json()
