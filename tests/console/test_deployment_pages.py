from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import APIKey
from accounts.roles import Role
from deployments.models import Deployment
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.factories import (
    DeploymentEventFactory,
    DeploymentFactory,
    ReplicaFactory,
    ServerlessPoolFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def offer(db):
    """A model with one published version, a priced H100 profile and a serverless pool."""
    model = ModelFactory(slug="mixtral-tiny", display_name="Mixtral tiny", moe=True)
    version = ModelVersionFactory(model=model, version="v1")
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    DedicatedPriceFactory(model_version=version, hardware_profile=profile, per_hour=Decimal("4"))
    ServerlessPoolFactory(model_version=version)  # with a token price of $0.70 / 1M
    return model, version, profile


def deploy_data(**fields):
    return {
        "name": "my-mixtral",
        "version": "v1",
        "type": "dedicated",
        "hardware_profile": "h100-80gb-x2",
        "min_replicas": "1",
        "max_replicas": "2",
        "requests_per_day": "1000",
        "input_tokens": "500",
        "output_tokens": "500",
        **fields,
    }


def test_the_deploy_form_offers_what_fits_with_its_price_and_an_estimate(
    console, organization, offer
):
    model, _, _ = offer
    HardwareProfileFactory(name="l4", gpu_memory_gb=24)  # too small: not offered
    response = console(organization, Role.DEVELOPER).get(f"/models/{model.slug}/deploy")
    assert response.status_code == 200
    form = response.context["form"]
    assert [value for value, _label in form.fields["hardware_profile"].choices] == [
        "",
        "h100-80gb-x2",
    ]
    assert form.initial["name"] == "mixtral-tiny"
    DeploymentFactory(organization=organization, name="mixtral-tiny")
    DeploymentFactory(organization=organization, name="mixtral-tiny-2")
    again = console(organization, Role.DEVELOPER).get(f"/models/{model.slug}/deploy")
    assert again.context["form"].initial["name"] == "mixtral-tiny-3"  # a free name
    body = response.content.decode()
    assert "$2,920.00" in body  # one replica, 730 hours at $4
    assert response.context["estimate"].cheaper == "serverless"


def test_the_estimate_follows_the_form(console, organization, offer):
    model, _, _ = offer
    client = console(organization, Role.DEVELOPER)
    response = client.post(
        f"/models/{model.slug}/deploy/estimate",
        deploy_data(requests_per_day="500000", min_replicas="2"),
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="estimate"')
    assert "$5,840.00" in body  # two replicas
    assert "<strong>dedicated</strong> is cheaper" in body
    assert not Deployment.objects.filter(organization=organization).exists()


def test_deploying_dedicated_goes_to_the_deployment_page(console, organization, offer):
    model, _, _ = offer
    response = console(organization, Role.DEVELOPER).post(
        f"/models/{model.slug}/deploy", deploy_data(), follow=True
    )
    deployment = Deployment.objects.get(organization=organization, name="my-mixtral")
    assert response.redirect_chain[-1][0] == f"/deployments/{deployment.pk}/"
    assert (deployment.type, deployment.hardware_profile.name) == ("dedicated", "h100-80gb-x2")
    assert (deployment.min_replicas, deployment.max_replicas) == (1, 2)
    assert "Deploying my-mixtral" in response.content.decode()


def test_deploying_serverless(console, organization, offer):
    model, _, _ = offer
    console(organization, Role.DEVELOPER).post(
        f"/models/{model.slug}/deploy", deploy_data(type="serverless", name="chat")
    )
    deployment = Deployment.objects.get(organization=organization, name="chat")
    assert deployment.type == "serverless" and deployment.pool_id


def test_a_refused_deploy_keeps_everything_typed(console, organization, offer):
    model, _, _ = offer
    DeploymentFactory(organization=organization, name="taken")
    client = console(organization, Role.DEVELOPER)
    response = client.post(
        f"/models/{model.slug}/deploy", deploy_data(name="taken", requests_per_day="777")
    )
    assert response.status_code == 400
    assert "already has a deployment named" in response.context["form"].errors["name"][0]
    body = response.content.decode()
    assert 'value="taken"' in body and 'value="777"' in body

    response = client.post(f"/models/{model.slug}/deploy", deploy_data(name="Bad Name!"))
    assert response.status_code == 400
    assert response.context["form"].errors["name"]

    response = client.post(
        f"/models/{model.slug}/deploy", deploy_data(min_replicas="3", max_replicas="1")
    )
    assert response.status_code == 400
    assert response.context["form"].errors
    assert Deployment.objects.filter(organization=organization).count() == 1


@pytest.mark.parametrize("role", [Role.VIEWER, Role.BILLING])
def test_only_builders_deploy_scale_and_delete(console, organization, offer, role):
    model, _, _ = offer
    deployment = DeploymentFactory(organization=organization)
    client = console(organization, role)
    assert client.get(f"/models/{model.slug}/deploy").status_code == 403
    assert client.post(f"/models/{model.slug}/deploy", deploy_data()).status_code == 403
    assert client.post(f"/deployments/{deployment.pk}/delete").status_code == 403
    assert (
        client.post(
            f"/deployments/{deployment.pk}/scale", {"min_replicas": 2, "max_replicas": 2}
        ).status_code
        == 403
    )
    page = client.get(f"/deployments/{deployment.pk}/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "/delete" not in body and "/scale" not in body
    deployment.refresh_from_db()
    assert deployment.status == "ready" and deployment.max_replicas == 1


def test_the_list_shows_status_and_polls_while_something_moves(console, organization):
    ready = DeploymentFactory(organization=organization, name="steady")
    client = console(organization, Role.VIEWER)
    response = client.get("/deployments/")
    assert "steady" in response.content.decode()
    assert response.context["poll"] == "15s"
    DeploymentFactory(organization=organization, name="coming", status="provisioning")
    DeploymentFactory(organization=organization, name="gone", status="deleted")
    response = client.get("/deployments/", HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="deployment-table"')
    assert 'hx-trigger="every 2s"' in body
    assert "coming" in body and "gone" not in body and ready.name in body


def test_the_detail_page_has_status_events_endpoint_and_snippets(console, organization, settings):
    settings.SIROCCO_PUBLIC_URL = "https://sirocco.example.com"
    deployment = DeploymentFactory(
        organization=organization,
        name="my-mixtral",
        status="provisioning",
        progress_phase="loading_weights",
        progress_percent=60,
    )
    ReplicaFactory(deployment=deployment, name="my-mixtral-0", ready=False, phase="starting")
    DeploymentEventFactory(deployment=deployment, reason="Scheduled", message="Placed it.")
    client = console(organization, Role.DEVELOPER)
    body = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert "Provisioning" in body and "Loading weights" in body
    assert 'max="100" value="60"' in body
    assert "my-mixtral-0" in body and "Placed it." in body
    assert "curl https://sirocco.example.com/v1/chat/completions" in body
    assert 'OpenAI(base_url="https://sirocco.example.com/v1"' in body
    assert '"model": "my-mixtral"' in body

    live = client.get(f"/deployments/{deployment.pk}/?live=1", HTTP_HX_REQUEST="true")
    fragment = live.content.decode()
    assert fragment.lstrip().startswith('<section id="live"')
    assert 'hx-trigger="every 2s"' in fragment


def test_replica_endpoints_are_shown_to_platform_operators_only(console, organization):
    deployment = DeploymentFactory(organization=organization, status="provisioning")
    ReplicaFactory(deployment=deployment, name="r-0", endpoint="http://10.0.0.7:8000")
    for role in Role.values:
        body = console(organization, role).get(f"/deployments/{deployment.pk}/").content.decode()
        assert "r-0" in body and "10.0.0.7" not in body
    operator = console(organization, Role.VIEWER)
    operator.user.is_staff = True
    operator.user.save()
    assert "http://10.0.0.7:8000" in operator.get(f"/deployments/{deployment.pk}/").content.decode()


def test_a_failed_deployment_shows_its_reason(console, organization):
    deployment = DeploymentFactory(
        organization=organization,
        status="failed",
        status_reason="Image pull failed: sirocco/runtime:0.1.0 not found.",
    )
    body = console(organization, Role.VIEWER).get(f"/deployments/{deployment.pk}/").content.decode()
    assert "It failed:" in body and "Image pull failed" in body
    assert 'role="alert"' in body


def test_scaling_and_deleting(console, organization, offer):
    _, version, profile = offer
    deployment = DeploymentFactory(
        organization=organization, model_version=version, hardware_profile=profile, priced=False
    )
    client = console(organization, Role.DEVELOPER)
    client.post(f"/deployments/{deployment.pk}/scale", {"min_replicas": 2, "max_replicas": 3})
    deployment.refresh_from_db()
    assert (deployment.min_replicas, deployment.max_replicas) == (2, 3)

    response = client.post(
        f"/deployments/{deployment.pk}/scale", {"min_replicas": 5, "max_replicas": 2}
    )
    assert response.status_code == 400
    assert response.context["scale_form"].errors
    assert 'value="5"' in response.content.decode()

    response = client.post(f"/deployments/{deployment.pk}/delete", follow=True)
    deployment.refresh_from_db()
    assert deployment.status == "deleting"
    assert "Deleting" in response.content.decode()


def test_another_organizations_deployment_is_a_404(console, organization, other_organization):
    theirs = DeploymentFactory(organization=other_organization)
    client = console(organization, Role.OWNER)
    assert client.get(f"/deployments/{theirs.pk}/").status_code == 404
    assert client.post(f"/deployments/{theirs.pk}/delete").status_code == 404
    assert client.get(f"/deployments/{theirs.pk}/playground").status_code == 404
    assert client.get("/deployments/not-a-uuid/").status_code == 404


def test_the_playground_gets_a_short_lived_inference_key_per_session(console, organization):
    deployment = DeploymentFactory(organization=organization, name="chat")
    client = console(organization, Role.DEVELOPER)
    response = client.get(f"/deployments/{deployment.pk}/playground")
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    key = APIKey.objects.get(organization=organization)
    assert key.scopes == ["inference"] and key.expires_at is not None
    assert key.matches(response.context["key"])
    body = response.content.decode()
    assert 'data-model="chat"' in body and 'data-endpoint="/v1/chat/completions"' in body
    client.get(f"/deployments/{deployment.pk}/playground")
    assert APIKey.objects.filter(organization=organization).count() == 1  # reused

    key.revoked_at = key.created_at
    key.save()
    client.get(f"/deployments/{deployment.pk}/playground")
    assert APIKey.objects.filter(organization=organization).count() == 2  # replaced


def test_the_playground_is_for_roles_that_may_make_keys(console, organization):
    deployment = DeploymentFactory(organization=organization)
    assert (
        console(organization, Role.VIEWER)
        .get(f"/deployments/{deployment.pk}/playground")
        .status_code
        == 403
    )
    assert console(organization, Role.VIEWER).get("/playground/").status_code == 403


def test_the_playground_index_picks_a_deployment(console, organization):
    deployment = DeploymentFactory(organization=organization, name="chat")
    client = console(organization, Role.DEVELOPER)
    assert "chat" in client.get("/playground/").content.decode()
    response = client.get("/playground/", {"deployment": str(deployment.pk)})
    assert response["Location"] == f"/deployments/{deployment.pk}/playground"
    assert client.get("/playground/", {"deployment": "nope"}).status_code == 200


def test_deployment_pages_run_a_constant_number_of_queries(console, organization):
    client = console(organization, Role.VIEWER)

    def count(path):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(path).status_code == 200
        return len(queries)

    first = DeploymentFactory(organization=organization)
    ReplicaFactory(deployment=first)
    DeploymentEventFactory(deployment=first)
    few = count("/deployments/"), count(f"/deployments/{first.pk}/")
    for _ in range(20):
        more = DeploymentFactory(organization=organization)
        ReplicaFactory(deployment=more)
        ReplicaFactory(deployment=first)
        DeploymentEventFactory(deployment=first)
    assert (count("/deployments/"), count(f"/deployments/{first.pk}/")) == few


def test_the_list_filters_with_the_api_s_filterset(console, organization):
    DeploymentFactory(organization=organization, name="ok", status="ready")
    DeploymentFactory(organization=organization, name="broken", status="failed")
    DeploymentFactory(organization=organization, name="old", status="deleted")
    client = console(organization, Role.VIEWER)

    def names(query):
        response = client.get("/deployments/", query)
        return response.status_code, {d.name for d in response.context["page"]}

    assert names({}) == (200, {"ok", "broken"})
    assert names({"status": "failed"}) == (200, {"broken"})
    assert names({"status": "deleted"}) == (200, {"old"})
    assert names({"type": "serverless"}) == (200, set())
    assert names({"status": "sideways"})[0] == 400
