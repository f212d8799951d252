"""REST: /api/v1/deployments and its events — happy paths, bad input, tenancy, roles."""

import pytest

from accounts.roles import Role
from deployments.models import Deployment
from tests.catalog.factories import (
    CpuProfileFactory,
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.factories import DeploymentEventFactory, DeploymentFactory, ReplicaFactory

pytestmark = pytest.mark.django_db
URL = "/api/v1/deployments"


@pytest.fixture
def catalog(db):
    version = ModelVersionFactory(model=ModelFactory(slug="mixtral-8x7b", moe=True), version="0.1")
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    DedicatedPriceFactory(model_version=version, hardware_profile=profile)
    CpuProfileFactory(name="cpu-small")
    return version


def create(api, **fields):
    body = {"name": "chat", "model": "mixtral-8x7b", "hardware_profile": "h100-80gb-x2", **fields}
    return api.post(URL, body, format="json")


def test_create_returns_the_pending_deployment(api, catalog):
    response = create(api, min_replicas=1, max_replicas=2)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert response["Location"] == f"{URL}/{body['id']}"
    assert body["name"] == "chat"
    assert (body["model"], body["version"], body["type"]) == ("mixtral-8x7b", "0.1", "dedicated")
    assert (body["hardware_profile"], body["runtime"]) == ("h100-80gb-x2", "vllm")
    assert (body["status"], body["generation"], body["observed_generation"]) == ("pending", 1, 0)
    assert body["progress"] == {"phase": "", "percent": 0}
    assert body["replicas"] == []


@pytest.mark.parametrize(
    ("fields", "status", "field", "words"),
    [
        ({"model": "gpt-9"}, 400, "model", "Unknown model 'gpt-9'"),
        ({"hardware_profile": "tpu"}, 400, "hardware_profile", "Unknown hardware profile"),
        ({"hardware_profile": "cpu-small"}, 400, "hardware_profile", "does not fit cpu-small"),
        ({"name": "My_Model"}, 400, "name", "lowercase letters"),
        ({"min_replicas": -1}, 400, "min_replicas", "greater than or equal to 0"),
        ({"replicas": 2}, 400, "replicas", "Unknown field"),
        ({"type": "spot"}, 400, "type", "not a valid choice"),
        ({"max_replicas": 5}, 409, "max_replicas", "max_gpus: this deployment needs 10 GPUs"),
    ],
)
def test_bad_input_is_a_problem_that_says_what_to_fix(api, catalog, fields, status, field, words):
    response = create(api, **fields)
    assert response.status_code == status, response.json()
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert words in body["detail"]
    assert body["errors"][0]["field"] == field
    assert not Deployment.objects.exists()


def test_a_taken_name_is_a_conflict(api, catalog):
    assert create(api).status_code == 201
    response = create(api)
    assert response.status_code == 409
    assert response.json()["code"] == "name_taken"


def test_quota_exceeded_has_its_own_code(api, catalog, organization):
    organization.max_deployments = 0
    organization.save()
    response = create(api)
    assert (response.status_code, response.json()["code"]) == (409, "quota_exceeded")
    assert response.json()["detail"].startswith("max_deployments:")


def test_list_detail_update_delete_and_events(api, catalog, organization):
    deployment_id = create(api).json()["id"]
    DeploymentFactory(organization=organization, name="old", status=Deployment.Status.DELETED)
    listed = api.get(URL).json()
    assert [d["name"] for d in listed["results"]] == ["chat"]
    assert api.get(URL, {"status": "deleted"}).json()["count"] == 1

    response = api.patch(f"{URL}/{deployment_id}", {"max_replicas": 3}, format="json")
    assert response.status_code == 200, response.json()
    assert (response.json()["max_replicas"], response.json()["generation"]) == (3, 1)

    response = api.delete(f"{URL}/{deployment_id}")
    assert response.status_code == 202
    assert (response.json()["status"], response.json()["desired_replicas"]) == ("deleting", 0)
    response = api.patch(f"{URL}/{deployment_id}", {"max_replicas": 2}, format="json")
    assert response.status_code == 409

    events = api.get(f"{URL}/{deployment_id}/events").json()["results"]
    assert [e["reason"] for e in events] == ["Deleting", "Updated", "Created"]
    assert api.get(f"{URL}/{deployment_id}/events", {"type": "Warning"}).json()["count"] == 0


def test_replicas_and_progress_are_shown(api, organization):
    deployment = DeploymentFactory(organization=organization)
    ReplicaFactory(deployment=deployment, name="r-0", endpoint="http://10.0.0.7:8000")
    body = api.get(f"{URL}/{deployment.pk}").json()
    assert body["progress"] == {"phase": "ready", "percent": 100}
    assert body["replicas"][0]["name"] == "r-0"


@pytest.mark.parametrize("role", Role.values)
def test_replica_endpoints_are_only_for_platform_operators(
    organization, key_client, session_client, role
):
    """A pod address inside the cluster is none of a tenant's business, whatever their role."""
    deployment = DeploymentFactory(organization=organization)
    ReplicaFactory(deployment=deployment, name="r-0", endpoint="http://10.0.0.7:8000")
    tenant_views = [
        key_client(organization, role).get(f"{URL}/{deployment.pk}").json(),
        key_client(organization, role).get(URL).json()["results"][0],
        session_client(organization, role)[0].get(f"{URL}/{deployment.pk}").json(),
    ]
    for body in tenant_views:
        [replica] = body["replicas"]
        assert set(replica) == {
            "name", "ready", "phase", "message", "restart_count", "started_at"
        }  # fmt: skip
        assert "10.0.0.7" not in str(body)
    operator, user = session_client(organization, role)
    user.is_staff = True
    user.save()
    [replica] = operator.get(f"{URL}/{deployment.pk}").json()["replicas"]
    assert replica["endpoint"] == "http://10.0.0.7:8000"
    [listed] = operator.get(URL).json()["results"]
    assert listed["replicas"][0]["endpoint"] == "http://10.0.0.7:8000"


def test_another_organizations_deployment_is_not_found(api, other_organization):
    theirs = DeploymentFactory(organization=other_organization)
    DeploymentEventFactory(deployment=theirs)
    for response in (
        api.get(f"{URL}/{theirs.pk}"),
        api.patch(f"{URL}/{theirs.pk}", {"max_replicas": 2}, format="json"),
        api.delete(f"{URL}/{theirs.pk}"),
        api.get(f"{URL}/{theirs.pk}/events"),
        api.get(f"{URL}/not-a-uuid"),
    ):
        assert response.status_code == 404
        assert response["Content-Type"] == "application/problem+json"
    theirs.refresh_from_db()
    assert theirs.status == "ready"


def test_viewers_read_but_cannot_deploy(key_client, organization, catalog):
    viewer = key_client(organization, Role.VIEWER)
    assert viewer.get(URL).status_code == 200
    response = create(viewer)
    assert response.status_code == 403


def test_unknown_query_parameters_and_orderings_are_rejected(api):
    assert api.get(URL, {"stauts": "ready"}).status_code == 400
    assert api.get(URL, {"ordering": "price"}).status_code == 400
    assert api.get(URL, {"status": "sleeping"}).status_code == 400


@pytest.mark.parametrize("count", [1, 15])
def test_listing_costs_the_same_queries_whatever_the_size(
    api, organization, count, django_assert_max_num_queries
):
    for _ in range(count):
        deployment = DeploymentFactory(organization=organization)
        ReplicaFactory(deployment=deployment)
    with django_assert_max_num_queries(8):
        response = api.get(URL)
    assert response.json()["count"] == count


def test_the_schema_documents_deployments(client):
    document = client.get("/api/schema/?format=json").json()
    assert {"/api/v1/deployments", "/api/v1/deployments/{id}/events"} <= set(document["paths"])


def test_routing_policy_is_chosen_at_create_and_patched(api, catalog, organization):
    # Prefix-aware by default; least in-flight on request; the gateway's route carries it.
    from deployments.selectors import route_for

    body = create(api).json()
    assert body["routing_policy"] == "prefix_aware"
    response = api.patch(f"{URL}/{body['id']}", {"routing_policy": "least_in_flight"}, "json")
    assert response.status_code == 200, response.json()
    assert response.json()["routing_policy"] == "least_in_flight"
    Deployment.objects.filter(pk=body["id"]).update(status=Deployment.Status.READY)
    route = route_for(organization_id=organization.pk, model="chat")
    assert route.routing_policy == "least_in_flight" and not route.prefix_aware
    response = api.patch(f"{URL}/{body['id']}", {"routing_policy": "round_robin"}, "json")
    assert response.status_code == 400
    assert "routing_policy" in str(response.json())
    other = create(api, name="other", routing_policy="least_in_flight").json()
    assert other["routing_policy"] == "least_in_flight"
