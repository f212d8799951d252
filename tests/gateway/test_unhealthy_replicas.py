"""A replica that refuses connections is reported by the gateway: every gateway stops routing
to it (it is no longer listed as ready) and its deployment is reconciled at once."""

import time

import httpx
import pytest

from deployments.models import Replica

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Hi"}]


def test_a_refusing_replica_is_taken_out_of_every_route(
    gateway, organization, inference_key, make_deployment, upstream_server
):
    make_deployment(
        organization, name="half", endpoints=["http://127.0.0.1:9", upstream_server.url]
    )
    _key, secret = inference_key(organization)
    with httpx.Client(base_url=gateway.v1, headers={"authorization": f"Bearer {secret}"}) as client:
        for _ in range(2):
            response = client.post("/chat/completions", json={"model": "half", "messages": CHAT})
            assert response.status_code == 200, response.text
    deadline = time.monotonic() + 10
    while Replica.objects.get(endpoint="http://127.0.0.1:9").ready:
        assert time.monotonic() < deadline, "the refusing replica was not reported"
        time.sleep(0.05)
    assert Replica.objects.get(endpoint=upstream_server.url).ready
