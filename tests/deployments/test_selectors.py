"""What the gateway asks: route_for and callable_models, cheap and tenant-safe."""

import pytest

from deployments.models import Deployment
from deployments.selectors import callable_models, route_for
from tests.deployments.factories import (
    DeploymentFactory,
    ReplicaFactory,
    ServerlessDeploymentFactory,
)

pytestmark = pytest.mark.django_db


def test_route_for_a_dedicated_deployment_lists_its_ready_replicas(
    organization, django_assert_num_queries
):
    deployment = DeploymentFactory(
        organization=organization,
        name="chat",
        model_version__served_model_name="mixtral-8x7b-instruct",
        model_version__runtime_args={"max_model_len": 16384},
    )
    ReplicaFactory(deployment=deployment, name="chat-b", endpoint="http://10.0.0.2:8000")
    ReplicaFactory(deployment=deployment, name="chat-a", endpoint="http://10.0.0.1:8000")
    ReplicaFactory(deployment=deployment, name="chat-c", ready=False, phase="loading_weights")
    # The deployment with its version and terms (none here), its fallback targets and its ready
    # replicas.
    with django_assert_num_queries(3):
        route = route_for(organization_id=organization.pk, model="chat")
    assert route.terms_pending is None
    assert route.deployment_id == deployment.pk
    assert route.organization_id == organization.pk
    assert route.model_version_id == deployment.model_version_id
    assert route.served_model_name == "mixtral-8x7b-instruct"
    assert route.max_model_len == 16384
    assert (route.deployment_type, route.status) == ("dedicated", "ready")
    assert route.replicas == [
        ("chat-a", "http://10.0.0.1:8000"),
        ("chat-b", "http://10.0.0.2:8000"),
    ]
    assert route.can_scale_from_zero is False


def test_route_for_a_serverless_entry_uses_the_pools_replicas(organization):
    entry = ServerlessDeploymentFactory(organization=organization, name="tiny")
    ReplicaFactory(deployment=entry.pool, name="pool-0", endpoint="http://127.0.0.1:41000")
    route = route_for(organization_id=organization.pk, model="tiny")
    assert route.deployment_id == entry.pk  # usage is the entry's, not the pool's
    assert route.deployment_type == "serverless"
    assert route.replicas == [("pool-0", "http://127.0.0.1:41000")]
    assert route.can_scale_from_zero is True  # the pool's min_replicas is 0


def test_route_for_never_reveals_other_tenants_or_deleted_deployments(
    organization, other_organization
):
    DeploymentFactory(organization=other_organization, name="theirs")
    DeploymentFactory(organization=organization, name="gone", status=Deployment.Status.DELETED)
    DeploymentFactory(organization=organization, name="going", status=Deployment.Status.DELETING)
    assert route_for(organization_id=organization.pk, model="theirs") is None
    assert route_for(organization_id=organization.pk, model="gone") is None
    assert route_for(organization_id=organization.pk, model="going") is None
    assert route_for(organization_id=organization.pk, model="nothing") is None


def test_a_failed_deployment_still_routes_but_cannot_scale_from_zero(organization):
    DeploymentFactory(
        organization=organization,
        name="broken",
        status=Deployment.Status.FAILED,
        min_replicas=0,
        desired_replicas=0,
    )
    route = route_for(organization_id=organization.pk, model="broken")
    assert (route.status, route.replicas, route.can_scale_from_zero) == ("failed", [], False)


def test_callable_models_lists_the_organizations_names(
    organization, other_organization, django_assert_num_queries
):
    first = DeploymentFactory(organization=organization, name="b-model")
    DeploymentFactory(organization=organization, name="a-model")
    DeploymentFactory(organization=organization, name="old", status=Deployment.Status.DELETED)
    DeploymentFactory(organization=other_organization, name="theirs")
    with django_assert_num_queries(1):
        models = callable_models(organization_id=organization.pk)
    assert [m.name for m in models] == ["a-model", "b-model"]
    name, created, project_id, shared = models[1]
    assert (name, created) == ("b-model", int(first.created_at.timestamp()))
    assert (project_id, shared) == (first.project_id, True)
