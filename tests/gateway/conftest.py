"""The gateway served by a real uvicorn on a free port, in front of a real runtime process
(the tiny MoE) or a stand-in replica (tests/gateway/upstream.py), with the tenants, keys and
deployments of each test in the test database."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from accounts.models import APIKey
from gateway.app import GatewayApp
from runtime.tiny_embedding import build_tiny_embedding
from runtime.tiny_moe import build_tiny_moe
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
from tests.gateway.upstream import Upstream
from tests.partner import start_fake_provider

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_SERVED_NAME = "tiny-moe"
EMBEDDING_SERVED_NAME = "tiny-embed"


class ServerThread:
    """An ASGI app under a real uvicorn server, on its own thread and event loop."""

    def __init__(self, app, **config):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", **config)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def call(self, coroutine, timeout=30):
        """Run a coroutine on the server's event loop (where the app's state lives)."""
        loop = self.server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def upstream_server():
    server = ServerThread(Upstream())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def runtime_process(tiny_moe_dir, tmp_path_factory):
    """One real runtime serving the tiny MoE, shared by the gateway tests."""
    log_path = tmp_path_factory.mktemp("gateway-runtime") / "runtime.log"
    yield from _serve(tiny_moe_dir, RUNTIME_SERVED_NAME, log_path)


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory) -> Path:
    return build_tiny_embedding(tmp_path_factory.mktemp("tiny-embedding"))


@pytest.fixture(scope="session")
def embedding_runtime(tiny_embedding_dir, tmp_path_factory):
    """One real runtime serving the tiny embedding model."""
    log_path = tmp_path_factory.mktemp("gateway-embedding-runtime") / "runtime.log"
    yield from _serve(tiny_embedding_dir, EMBEDDING_SERVED_NAME, log_path)


def _serve(model_dir: Path, served_name: str, log_path: Path):
    """`python -m runtime serve` on a free port; yields its URL once /health says ready."""
    command = [
        sys.executable, "-m", "runtime", "serve",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-num-seqs", "16",
        # One thread, as the runtime tests run it: OpenMP threads spinning on a shared 2-core
        # machine make a loaded machine's runtime ten times slower.
        "--cpu-threads", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if url is None:
                found = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", log_path.read_text())
                url = found.group(1) if found else None
            if url:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"the runtime did not become ready:\n{log_path.read_text()}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def gateway_server(tmp_path_factory):
    """The standalone gateway app (with /healthz, /readyz, /metrics) under uvicorn. Its usage
    spool is this session's own: an orphan left by another run must not ship into our
    database."""
    app = GatewayApp(
        health=True,
        load_report_seconds=0.3,
        route_cache_seconds=0.2,
        usage_spool_dir=str(tmp_path_factory.mktemp("usage-spool")),
    )
    server = ServerThread(app)
    yield server
    server.stop()


@dataclass
class Gateway:
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def v1(self) -> str:
        return self.server.url + "/v1"

    @property
    def app(self) -> GatewayApp:
        return self.server.app

    def reset(self, **overrides):
        """A fresh gateway state (caches, buckets, writer) for the next request."""
        self.server.call(self.app.shutdown())
        self.app.config_overrides.update(overrides)


@pytest.fixture
def gateway(gateway_server, transactional_db):
    """The running gateway, with state fresh for this test: ids restart in each test database,
    so the caches and rate-limit buckets of an earlier test must not leak into this one."""
    handle = Gateway(gateway_server)
    redis_prefix = f"test:gateway:{uuid.uuid4().hex[:12]}:"
    base = dict(handle.app.config_overrides)
    handle.reset(redis_prefix=redis_prefix)
    yield handle
    handle.reset()
    handle.app.config_overrides.clear()
    handle.app.config_overrides.update(base)


@pytest.fixture
def make_deployment():
    """A ready deployment of `organization` named `name` whose replicas are `endpoints`."""

    def make(organization, *, name, endpoints=(), served_model_name="stub", **fields):
        deployment = DeploymentFactory(organization=organization, name=name, **fields)
        version = deployment.model_version
        version.served_model_name = served_model_name
        version.save(update_fields=["served_model_name"])
        for endpoint in endpoints:
            ReplicaFactory(deployment=deployment, endpoint=endpoint)
        return deployment

    return make


@pytest.fixture
def inference_key(make_api_key):
    def make(organization, **fields):
        return make_api_key(organization, scopes=[APIKey.Scope.INFERENCE], **fields)

    return make


# A partner model's provider: the fake provider process (tests/fakeprovider.py), one per test
# module, back to its normal answers and with its request log emptied for each test.
@pytest.fixture(scope="module")
def fake_provider(tmp_path_factory):
    provider = start_fake_provider(tmp_path_factory.mktemp("fakeprovider") / "provider.log")
    yield provider
    provider.stop()


@pytest.fixture
def provider(fake_provider):
    fake_provider.control(mode="ok", reset_requests=True)
    yield fake_provider
    fake_provider.control(mode="ok")
