"""Malformed and hostile requests, and dead dependencies, against the running gateway: each is
answered in OpenAI's error format with a 4xx (or a 5xx with a code, and Retry-After when it is
worth retrying), never a 500, and never served unbilled."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from metering.models import UsageEvent
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def tenant(gateway, organization, inference_key, make_deployment, upstream_server):
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    make_deployment(organization, name="dead", endpoints=["http://127.0.0.1:9"])
    make_deployment(
        organization, name="breaks", endpoints=[upstream_server.url], served_model_name="stub-break"
    )
    _key, secret = inference_key(organization)
    return secret


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_json_nested_deep_is_a_400(gateway, tenant):
    auth = {"authorization": f"Bearer {tenant}"}
    for depth in (255, 600, 1_022, 100_000):
        nested = b"[" * depth + b"]" * depth
        body = b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "x": '
        response = httpx.post(
            gateway.v1 + "/chat/completions", content=body + nested + b"}", headers=auth
        )
        assert error_of(response, 400)["code"] == "invalid_json"
    assert UsageEvent.objects.count() == 0


def test_two_authorization_headers_are_refused(gateway, tenant, inference_key, organization):
    _other, other_secret = inference_key(organization)
    for values in ((tenant, tenant), (tenant, other_secret), ("sk-unknown", tenant)):
        headers = [("authorization", f"Bearer {value}") for value in values]
        for path, method in (("/chat/completions", "POST"), ("/models", "GET")):
            response = httpx.request(
                method, gateway.v1 + path, headers=headers, json=CHAT if method == "POST" else None
            )
            error = error_of(response, 400)
            assert error["code"] == "invalid_authorization_header"
            assert "more than one Authorization header" in error["message"]
    assert UsageEvent.objects.count() == 0


def test_a_dead_replica_is_a_502_with_a_code(gateway, tenant):
    auth = {"authorization": f"Bearer {tenant}"}
    response = httpx.post(
        gateway.v1 + "/chat/completions", json={**CHAT, "model": "dead"}, headers=auth
    )
    error = error_of(response, 502)
    assert (error["type"], error["code"]) == ("server_error", "replica_unreachable")
    assert response.headers["retry-after"]
    assert UsageEvent.objects.count() == 0  # it never reached a replica
    # A replica that breaks off mid-stream: the stream's last event says so, with a code.
    broken = httpx.post(
        gateway.v1 + "/chat/completions",
        json={**CHAT, "model": "breaks", "stream": True},
        headers=auth,
    )
    last = [line for line in broken.text.splitlines() if line.startswith("data: ")][-1]
    assert '"code":"replica_stream_broken"' in last
    assert UsageEvent.objects.get().status_code == 502  # billed: it reached a replica


def _sessions() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        return {pid for (pid,) in cursor.fetchall()}


def _end_sessions_since(before: set[int]) -> None:
    """End the sessions the gateway process opened through the proxy, so the test database can
    be dropped after the run: they can outlive both (the proxy's upstream sockets are not always
    closed at once when it stops)."""
    deadline = time.monotonic() + 2
    while (left := _sessions() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    with connection.cursor() as cursor:
        for pid in left:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gateway_process(transactional_db, tmp_path):
    """The gateway as production runs it (`uvicorn gateway.asgi:application`), in a process of
    its own, reaching PostgreSQL through a proxy the test can cut."""
    if connection.vendor != "postgresql":
        pytest.skip("the database is cut with a TCP proxy: PostgreSQL only")
    settings = connection.settings_dict
    before = _sessions()
    proxy = FaultProxy(settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432)).start()
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "TEST_DATABASE_NAME", "PYTEST_CURRENT_TEST")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.test",
        DATABASE_URL=f"postgres://{settings['USER']}@127.0.0.1:{proxy.port}/{settings['NAME']}",
        SIROCCO_VAR_DIR=str(tmp_path / "var"),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "gateway.log"
    command = [
        sys.executable, "-m", "uvicorn", "gateway.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proxy, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        proxy.stop()
        _end_sessions_since(before)


def test_a_dead_database_is_a_503_with_retry_after(
    gateway_process, organization, inference_key, make_deployment, upstream_server
):
    url, proxy, log_path = gateway_process
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    _key, warm_secret = inference_key(organization)
    _key, cold_secret = inference_key(organization)
    warm = {"authorization": f"Bearer {warm_secret}"}
    assert httpx.get(url + "/v1/models", headers=warm, timeout=30).status_code == 200
    proxy.cut()  # PostgreSQL refuses: existing connections reset, new ones refused
    try:
        cold = {"authorization": f"Bearer {cold_secret}"}  # not cached: needs the database
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", CHAT),
        ):
            started = time.monotonic()
            response = httpx.request(method, url + path, json=body, headers=cold, timeout=30)
            error = error_of(response, 503)
            assert (error["type"], error["code"]) == ("server_error", "database_unavailable")
            assert int(response.headers["retry-after"]) > 0
            assert time.monotonic() - started < 10  # refused at once, not after a timeout
        assert b"Traceback" not in log_path.read_bytes()
    finally:
        proxy.restore()
    assert httpx.get(url + "/v1/models", headers=cold, timeout=30).status_code == 200
