"""The app while the model loads, and when loading fails (in process, with Starlette's client)."""

import threading

import pytest
from starlette.testclient import TestClient

from runtime.loader import DEFAULT_CACHE_DIR
from runtime.server import create_app, load_model

pytestmark = pytest.mark.nodb


def _load_tiny(tiny_moe_dir, listener):
    return load_model(
        str(tiny_moe_dir),
        listener,
        device="cpu",
        dtype="auto",
        max_model_len=256,
        max_num_seqs=2,
        download_dir=DEFAULT_CACHE_DIR,
    )


def test_requests_while_loading_get_503_with_retry_after_then_200(tiny_moe_dir):
    release = threading.Event()
    loaded = threading.Event()

    def slow_load(listener):
        release.wait(timeout=60)
        model = _load_tiny(tiny_moe_dir, listener)
        loaded.set()
        return model

    app = create_app(served_model_name="tiny", load_model=slow_load)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.headers["retry-after"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 503
        assert chat.headers["retry-after"]
        assert "loading" in chat.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 503
        assert client.get("/metrics").status_code == 200

        release.set()
        assert loaded.wait(timeout=60)
        for _ in range(100):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").status_code == 200
        response = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3}
        )
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] >= 1


def test_a_failed_load_is_reported_and_stops_the_server(tmp_path):
    stopped = threading.Event()

    def broken_load(listener):
        return _load_tiny(tmp_path / "missing", listener)

    app = create_app(served_model_name="tiny", load_model=broken_load, on_load_failure=stopped.set)
    with TestClient(app) as client:
        assert stopped.wait(timeout=30)
        health = client.get("/health")
        assert health.status_code == 503
        assert "does not exist" in health.json()["error"]
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert response.status_code == 503
        assert "failed to load" in response.json()["error"]["message"]
