"""Every refusal is OpenAI's error format with a message that says what to fix, and every
response carries x-request-id."""

import json
import re
import time
from datetime import timedelta

import httpx
import pytest
from django.db import OperationalError
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.services import api_key_revoke
from deployments.models import Replica
from metering.models import UsageEvent

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def setup(gateway, organization, inference_key, make_deployment, upstream_server):
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    key, secret = inference_key(organization)
    client = httpx.Client(base_url=gateway.v1, headers={"authorization": f"Bearer {secret}"})
    yield client, key, secret
    client.close()


def assert_error(response, status, *, type_=None, code=None, param=None, says=None):
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"].startswith("req_") or response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if type_:
        assert error["type"] == type_
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param
    if says:
        assert says in error["message"], error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (b"{not json", None, "could not parse the JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"", None, "body is empty"),
        (b'{"messages": []}', "model", "must provide a model"),
        (b'{"model": 7, "messages": []}', "model", "non-empty string"),
        (b'{"model": "chat"}', "messages", "must provide `messages`"),
        (b'{"model": "chat", "messages": "hi"}', "messages", "non-empty array"),
        (b'{"model": "chat", "messages": [3]}', "messages[0]", "must be an object"),
        (b'{"model": "chat", "messages": [{"content": "x"}]}', "messages[0].role", "string"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": 5}]}', "messages[0].content", None),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "true or false"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens", "positive integer"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', "max_tokens", "positive integer"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', "stream_options", "only allowed when `stream` is true"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"continuous_usage_stats": 1}}', "stream_options.continuous_usage_stats", "true or false"),
    ],
)  # fmt: skip
def test_malformed_chat_requests_are_400_with_what_to_fix(setup, body, param, says):
    client, _key, _secret = setup
    response = client.post("/chat/completions", content=body)
    assert_error(response, 400, type_="invalid_request_error", param=param, says=says)
    assert UsageEvent.objects.count() == 0


@pytest.mark.parametrize("depth", [254, 300, 1022, 5000])
def test_json_nested_too_deep_to_pass_on_is_a_400(setup, depth):
    """orjson reads 1024 levels and writes 254: anything deeper than the gateway can write
    upstream is refused before any work, never a 500."""
    client, _key, _secret = setup
    nested = b"[" * depth + b"]" * depth
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "extra": ' + nested
    response = client.post("/chat/completions", content=body + b"}")
    assert_error(response, 400, code="invalid_json", says="254 levels")
    assert UsageEvent.objects.count() == 0


def test_completions_prompt_must_be_text_or_tokens(setup):
    client, _key, _secret = setup
    response = client.post("/completions", json={"model": "chat", "prompt": {"a": 1}})
    assert_error(response, 400, param="prompt", says="array of token ids")


def test_max_tokens_over_the_context_is_400(setup):
    client, _key, _secret = setup
    # The factory's version serves a 32768-token context.
    response = client.post(
        "/chat/completions", json={"model": "chat", "messages": CHAT, "max_tokens": 40_000}
    )
    assert_error(response, 400, code="context_length_exceeded", param="max_tokens", says="32768")


def test_body_over_the_limit_is_413(setup, gateway):
    client, _key, _secret = setup
    gateway.reset(max_body_bytes=1000)
    response = client.post(
        "/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x" * 2000}]},
    )
    assert_error(response, 413, says="over the 1000 bytes")


def test_unknown_model_and_another_tenants_model_look_the_same(
    setup, other_organization, make_deployment
):
    client, _key, _secret = setup
    make_deployment(other_organization, name="theirs", endpoints=["http://127.0.0.1:9"])
    unknown = client.post("/chat/completions", json={"model": "nothing", "messages": CHAT})
    theirs = client.post("/chat/completions", json={"model": "theirs", "messages": CHAT})
    for response, name in ((unknown, "nothing"), (theirs, "theirs")):
        error = assert_error(response, 404, code="model_not_found", param="model")
        assert error["message"].replace(name, "X") == unknown.json()["error"]["message"].replace(
            "nothing", "X"
        )


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "didn't provide an API key"),
        ("Basic abc", "Malformed Authorization"),
        ("Bearer sk-not-a-real-key", "Incorrect API key"),
    ],
)
def test_bad_keys_are_401(setup, gateway, header, says):
    headers = {"authorization": header} if header else {}
    response = httpx.post(
        gateway.v1 + "/chat/completions", json={"model": "chat", "messages": CHAT}, headers=headers
    )
    assert_error(response, 401, code="invalid_api_key", says=says)


def test_revoked_expired_and_unscoped_keys_are_refused(setup, gateway, organization, make_api_key):
    _client, key, secret = setup
    api_key_revoke(actor=Actor.system(organization), api_key=key)
    response = httpx.get(gateway.v1 + "/models", headers={"authorization": f"Bearer {secret}"})
    assert_error(response, 401, says="was revoked")
    expiring, expired = make_api_key(organization, scopes=["inference"])
    APIKey.objects.filter(pk=expiring.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    response = httpx.get(gateway.v1 + "/models", headers={"authorization": f"Bearer {expired}"})
    assert_error(response, 401, says="has expired")
    _key, management_only = make_api_key(organization, scopes=["management"])
    response = httpx.get(
        gateway.v1 + "/models", headers={"authorization": f"Bearer {management_only}"}
    )
    assert_error(response, 403, type_="permission_error", says="'inference' scope")


def test_the_request_id_is_minted_and_a_client_id_is_echoed_apart(setup):
    client, _key, _secret = setup
    kept = client.get("/models", headers={"x-request-id": "my-trace.42"})
    assert re.fullmatch(r"req_[0-9a-f]{32}", kept.headers["x-request-id"])
    assert kept.headers["x-client-request-id"] == "my-trace.42"
    openai_name = client.get("/models", headers={"x-client-request-id": "trace-7"})
    assert openai_name.headers["x-client-request-id"] == "trace-7"
    dropped = client.get("/models", headers={"x-request-id": "bad id\twith tab"})
    assert dropped.headers["x-request-id"].startswith("req_")
    assert "x-client-request-id" not in dropped.headers


def test_wrong_method_and_unknown_path(setup):
    client, _key, _secret = setup
    assert_error(client.get("/chat/completions"), 405, says="use POST")
    assert_error(client.get("/embeddings"), 405, says="use POST")
    assert_error(client.post("/images/generations", json={}), 404, says="Invalid URL")


def test_upstream_down_is_502_and_html_errors_are_wrapped(
    setup, organization, make_deployment, upstream_server
):
    client, _key, _secret = setup
    make_deployment(organization, name="down", endpoints=["http://127.0.0.1:9"])
    make_deployment(
        organization,
        name="broken",
        endpoints=[upstream_server.url],
        served_model_name="stub-html-500",
    )
    response = client.post("/chat/completions", json={"model": "down", "messages": CHAT})
    assert_error(response, 502, type_="server_error", says="accepted the connection")
    _wait_until_reported_unhealthy("http://127.0.0.1:9")
    assert UsageEvent.objects.count() == 0  # never reached a replica

    response = client.post("/chat/completions", json={"model": "broken", "messages": CHAT})
    assert_error(response, 502, says="not an OpenAI response")
    row = UsageEvent.objects.get()
    assert (row.status_code, row.prompt_tokens, row.completion_tokens) == (502, 0, 0)


def test_a_refused_replica_is_skipped_for_another(
    setup, organization, make_deployment, upstream_server
):
    client, _key, _secret = setup
    make_deployment(
        organization, name="half", endpoints=["http://127.0.0.1:9", upstream_server.url]
    )
    for _ in range(3):
        response = client.post("/chat/completions", json={"model": "half", "messages": CHAT})
        assert response.status_code == 200, response.text
    assert UsageEvent.objects.filter(status_code=200).count() == 3


def test_deployment_without_ready_replicas_is_503_with_retry_after(
    setup, organization, make_deployment
):
    client, _key, _secret = setup
    make_deployment(organization, name="failed", status="failed", min_replicas=1)
    response = client.post("/chat/completions", json={"model": "failed", "messages": CHAT})
    assert_error(response, 503, says="no ready replica")
    assert int(response.headers["retry-after"]) > 0


def test_spend_limit_reached_is_429_insufficient_quota(setup, organization):
    client, _key, _secret = setup
    organization.monthly_spend_limit = 0
    organization.save(update_fields=["monthly_spend_limit"])
    response = client.post("/chat/completions", json={"model": "chat", "messages": CHAT})
    assert_error(response, 429, type_="insufficient_quota", code="insufficient_quota")
    assert json.loads(response.content)["error"]["message"].startswith("You exceeded")


def _wait_until_reported_unhealthy(endpoint: str) -> None:
    """The gateway reports a refused replica from a DB thread of its own, just after the 502.
    The test database is SQLite's shared in-memory cache, where a write that meets another
    connection's transaction fails at once ("database table is locked") instead of waiting:
    let the report land before this test touches the database again."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if not Replica.objects.filter(endpoint=endpoint, ready=True).exists():
                return
        except OperationalError:
            pass  # the report's transaction is still open
        time.sleep(0.05)
    raise AssertionError(f"the gateway did not report {endpoint} as unhealthy within 10 s")
