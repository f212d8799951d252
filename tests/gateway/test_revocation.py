"""A revoked key stops working within a second: in this process through the signal, in other
gateway processes through Redis pub/sub."""

import asyncio
import time

import httpx
import pytest
from django.test import override_settings

from accounts.actors import Actor
from accounts.services import api_key_revoke
from gateway import revocation
from gateway.app import GatewayApp
from tests.gateway.conftest import ServerThread
from tests.gateway.test_limits import REDIS_URL, needs_redis

pytestmark = pytest.mark.slow


def wait_for_401(url: str, secret: str, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        response = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {secret}"})
        if response.status_code == 401:
            assert "was revoked" in response.json()["error"]["message"]
            return time.monotonic() - started
        assert response.status_code == 200
        time.sleep(0.02)
    raise AssertionError(f"the key still worked {within}s after its revocation")


def test_revocation_reaches_this_process_at_once(gateway, organization, inference_key):
    key, secret = inference_key(organization)
    headers = {"authorization": f"Bearer {secret}"}
    assert httpx.get(gateway.v1 + "/models", headers=headers).status_code == 200  # now cached
    api_key_revoke(actor=Actor.system(organization), api_key=key)
    assert wait_for_401(gateway.url, secret, within=1.0) < 1.0


@needs_redis
def test_revocation_reaches_other_gateway_processes_through_redis(
    gateway, organization, inference_key
):
    prefix = gateway.app.config_overrides["redis_prefix"]
    other = ServerThread(GatewayApp(redis_url=REDIS_URL, redis_prefix=prefix))
    try:
        key, secret = inference_key(organization)
        headers = {"authorization": f"Bearer {secret}"}
        assert httpx.get(other.url + "/v1/models", headers=headers).status_code == 200
        # Only Redis may tell the other gateway: take it off this process's signal.
        revocation.unregister(other.app.gateway.keys)
        other.call(asyncio.sleep(0.3))  # its subscription is up
        with override_settings(REDIS_URL=REDIS_URL, GATEWAY_REDIS_PREFIX=prefix):
            api_key_revoke(actor=Actor.system(organization), api_key=key)
        assert wait_for_401(other.url, secret, within=1.0) < 1.0
    finally:
        other.call(other.app.shutdown())
        other.stop()
