"""The embedded default: the web process serves /v1 through the gateway's own ASGI app and
everything else through Django."""

import httpx
import pytest

from controlplane.asgi import application, gateway_application
from tests.gateway.conftest import ServerThread

pytestmark = pytest.mark.slow


def test_web_process_routes_v1_to_the_gateway_and_the_rest_to_django(
    transactional_db, organization, inference_key, make_deployment
):
    make_deployment(organization, name="chat")
    _key, secret = inference_key(organization)
    server = ServerThread(application)
    try:
        models = httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert [m["id"] for m in models.json()["data"]] == ["chat"]
        assert models.headers["x-request-id"].startswith("req_")
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        # /v1 errors are OpenAI's format, not Django's problem JSON.
        assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"]
        assert gateway_application.gateway is not None  # started by the lifespan
    finally:
        server.stop()
    assert gateway_application.gateway is None  # and stopped (usage flushed) by it
