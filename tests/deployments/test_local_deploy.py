"""A dedicated mixtral-tiny deployment through the services and the reconciler on the local
provisioner: real runtime process, a chat completion through its route, GPU-time rows, and a
delete that stops the process."""

import json
import time
import urllib.request
from pathlib import Path

import pytest

from accounts.actors import Actor
from deployments import services
from deployments.models import ReplicaUsage
from deployments.provisioners.local import _process_state, stop_all
from deployments.reconciler import reconcile
from deployments.selectors import route_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture
def local(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    settings.ARTIFACT_STORE_URL = ""
    settings.SIROCCO_PROVISIONER = "local"
    from catalog.tiny import ensure_tiny_moe

    yield ensure_tiny_moe()
    stop_all(settings.VAR_DIR / "replicas")  # never leave a runtime behind, even on failure


def converge(deployment, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requeue = reconcile(deployment.pk)
        if requeue is None:
            deployment.refresh_from_db()
            return deployment
        time.sleep(requeue)
    pytest.fail("did not converge")


def test_mixtral_tiny_deploys_locally_answers_and_is_deleted(organization, local, settings):
    deployment = services.deployment_create(
        actor=Actor.system(organization),
        name="tiny",
        model="mixtral-tiny",
        hardware_profile="cpu-small",
    )
    deployment = converge(deployment)
    assert (deployment.status, deployment.progress_percent) == ("ready", 100)
    [replica] = deployment.replicas.all()
    assert replica.pid and replica.endpoint == f"http://127.0.0.1:{replica.port}"
    log = Path(settings.VAR_DIR) / "replicas" / str(deployment.pk) / f"{replica.name}.log"
    assert log.exists()

    route = route_for(organization_id=organization.pk, model="tiny")
    [(name, endpoint)] = route.replicas
    request = urllib.request.Request(
        f"{endpoint}/v1/chat/completions",
        data=json.dumps(
            {
                "model": route.served_model_name,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["usage"]["completion_tokens"] > 0
    usage = ReplicaUsage.objects.get(deployment=deployment)
    assert (usage.replica_name, usage.ended_at) == (name, None)

    services.deployment_delete(actor=Actor.system(organization), deployment=deployment)
    deployment = converge(deployment)
    assert deployment.status == "deleted"
    assert _process_state(replica.pid) in (None, "Z")
    assert not log.parent.exists()
    usage.refresh_from_db()
    assert usage.ended_at is not None


def test_the_tiny_embedding_model_deploys_locally_and_embeds(organization, local, settings):
    """embed-tiny (bootstrap_demo's embedding model) on the builtin runtime: the catalog's
    import and the provisioner's arguments make a replica that serves /v1/embeddings."""
    from catalog.tiny import ensure_tiny_embedding

    ensure_tiny_embedding()
    deployment = services.deployment_create(
        actor=Actor.system(organization),
        name="vectors",
        model="embed-tiny",
        hardware_profile="cpu-small",
    )
    deployment = converge(deployment)
    assert deployment.status == "ready"
    route = route_for(organization_id=organization.pk, model="vectors")
    assert route.max_model_len == 512
    [(_name, endpoint)] = route.replicas
    request = urllib.request.Request(
        f"{endpoint}/v1/embeddings",
        data=json.dumps(
            {"model": route.served_model_name, "input": ["Hello", "Bonjour"], "dimensions": 32}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert [len(item["embedding"]) for item in body["data"]] == [32, 32]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    services.deployment_delete(actor=Actor.system(organization), deployment=deployment)
    assert converge(deployment).status == "deleted"
