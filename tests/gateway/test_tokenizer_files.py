"""The model's tokenizer for a version stored on S3 (moto's server over loopback): only the
tokenizer files are fetched, through the catalog's artifact store, checked against what the
catalog recorded, cached under VAR_DIR; a failing or hung store leaves the gateway counting
with the estimate. And the files are read the way transformers reads them."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest

from catalog.artifacts import get_store
from catalog.models import ModelVersion
from catalog.permissions import operator_system_actor
from catalog.services import model_version_import
from gateway.sources import tokenizer_source
from gateway.tokenizer_files import TokenizerFetchError, tokenizer_folder
from gateway.tokens import ModelTokenizer, estimate_chat, estimate_text
from metering.models import UsageEvent
from runtime.tiny_moe import CHAT_TEMPLATE, END_OF_TEXT
from tests.catalog.factories import ModelVersionFactory

CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]
STREAMED = "Hello, world"  # what the "stub-legacy-break" replica sends before breaking off


@pytest.fixture
def s3_artifacts(s3_bucket, settings, tmp_path):
    """The artifact store on S3 (moto), and a VAR_DIR of the test's own."""
    settings.VAR_DIR = tmp_path / "var"
    settings.ARTIFACT_STORE_URL = f"s3://{s3_bucket}/artifacts"
    return s3_bucket


def import_weights(version: ModelVersion, source: Path) -> ModelVersion:
    """The operator's import (catalog_import) of `source` as the version's weights."""
    ModelVersion.objects.filter(pk=version.pk).update(status=ModelVersion.Status.DRAFT)
    version.refresh_from_db()
    return model_version_import(actor=operator_system_actor(), version=version, source=source)


def cached_folders(settings) -> list[str]:
    cache = Path(settings.VAR_DIR) / "gateway-tokenizers"
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


@pytest.mark.django_db
def test_only_the_tokenizer_files_come_down_once_and_count_like_the_original(
    s3_artifacts, settings, tiny_moe_dir, monkeypatch
):
    version = import_weights(ModelVersionFactory(), tiny_moe_dir)
    assert version.artifact_uri.startswith(f"s3://{s3_artifacts}/artifacts/")

    folder = tokenizer_folder(tokenizer_source(version_id=version.id))

    assert folder.parent == Path(settings.VAR_DIR) / "gateway-tokenizers"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert cached_folders(settings) == [folder.name]  # no partial download left behind
    fetched, original = ModelTokenizer(folder), ModelTokenizer(tiny_moe_dir)
    assert fetched.count_chat(CHAT) == original.count_chat(CHAT)
    assert fetched.count_text(STREAMED) == original.count_text(STREAMED)

    # Cached: a later load (another process, after a restart) needs no store at all.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    assert tokenizer_folder(tokenizer_source(version_id=version.id)) == folder


@pytest.mark.django_db
def test_a_file_changed_in_the_store_since_the_import_is_refused(
    s3_artifacts, settings, tiny_moe_dir
):
    version = import_weights(ModelVersionFactory(), tiny_moe_dir)
    key = f"artifacts/models/{version.model.slug}/{version.version}/tokenizer.json"
    boto3.client("s3").put_object(Bucket=s3_artifacts, Key=key, Body=b'{"not": "it"}')

    with pytest.raises(TokenizerFetchError, match="changed since the import"):
        tokenizer_folder(tokenizer_source(version_id=version.id))
    assert cached_folders(settings) == []


@pytest.mark.django_db
def test_a_version_whose_uri_was_set_by_hand_outside_the_configured_store(
    s3_bucket, settings, tmp_path, tiny_moe_dir
):
    settings.VAR_DIR = tmp_path / "var"
    settings.ARTIFACT_STORE_URL = ""  # the configured store is a local folder
    client = boto3.client("s3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        client.upload_file(str(tiny_moe_dir / name), s3_bucket, f"hand/mixtral/{name}")
    client.put_object(Bucket=s3_bucket, Key="hand/mixtral/model.safetensors", Body=b"weights")
    version = ModelVersionFactory(artifact_uri=f"s3://{s3_bucket}/hand/mixtral")

    source = tokenizer_source(version_id=version.id)
    assert source.recorded is None  # no recorded artifacts: the store says what exists
    folder = tokenizer_folder(source)

    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert ModelTokenizer(folder).count_chat(CHAT) == ModelTokenizer(tiny_moe_dir).count_chat(CHAT)


@pytest.mark.django_db
def test_a_version_without_a_tokenizer_has_none(s3_bucket, settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="w/model.safetensors", Body=b"weights")
    version = ModelVersionFactory(artifact_uri=f"s3://{s3_bucket}/w")
    assert tokenizer_folder(tokenizer_source(version_id=version.id)) is None
    assert tokenizer_source(version_id=ModelVersionFactory(artifact_uri="").id) is None


@pytest.mark.nodb
def test_special_tokens_map_and_chat_template_file_are_read_as_transformers_does(
    tiny_moe_dir, tmp_path
):
    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(tiny_moe_dir, tmp_path / "model"))
    # The config names no bos_token; the legacy map does, and the template file uses it.
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": END_OF_TEXT}))
    (folder / "chat_template.jinja").write_text("{{ bos_token }}" + CHAT_TEMPLATE)
    reference = AutoTokenizer.from_pretrained(folder)
    rendered = reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(END_OF_TEXT)

    expected = len(reference.encode(rendered, add_special_tokens=False))
    assert ModelTokenizer(folder).count_chat(CHAT) == expected
    assert ModelTokenizer(tiny_moe_dir).count_chat(CHAT) == expected - 1


# ---- through the gateway --------------------------------------------------------------------


@pytest.fixture
def tenant(gateway, organization, inference_key):
    _key, secret = inference_key(organization)
    return {"authorization": f"Bearer {secret}"}


def broken_stream(gateway, tenant):
    """A streamed chat whose replica breaks off after 3 chunks, without its usage: the
    gateway bills what it counts."""
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        json={"model": "chat", "messages": CHAT, "stream": True},
        headers=tenant,
        timeout=30,
    )
    assert response.status_code == 200  # the stream started; its end says it broke
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert '"server_error"' in events[-1]
    return UsageEvent.objects.get()


@pytest.fixture
def s3_deployment(s3_artifacts, organization, make_deployment, upstream_server, tiny_moe_dir):
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[upstream_server.url],
        served_model_name="stub-legacy-break",
    )
    import_weights(deployment.model_version, tiny_moe_dir)
    return deployment


@pytest.mark.slow
def test_a_broken_stream_is_billed_with_the_tokenizer_fetched_from_s3(
    gateway, tenant, s3_deployment, tiny_moe_dir, settings
):
    row = broken_stream(gateway, tenant)
    tokenizer = ModelTokenizer(tiny_moe_dir)
    assert row.usage_source == UsageEvent.Source.COUNTED and row.status_code == 502
    assert row.prompt_tokens == tokenizer.count_chat(CHAT)
    assert row.completion_tokens == tokenizer.count_text(STREAMED)
    assert len(cached_folders(settings)) == 1


@pytest.mark.slow
def test_a_failing_fetch_bills_the_estimate_and_logs_it(
    gateway, tenant, s3_deployment, s3_artifacts, caplog
):
    version = s3_deployment.model_version
    store = get_store()
    store.delete(f"models/{version.model.slug}/{version.version}/tokenizer.json")

    row = broken_stream(gateway, tenant)

    assert row.prompt_tokens == estimate_chat(CHAT)
    assert row.completion_tokens == estimate_text(STREAMED)
    assert f"no tokenizer for model version {version.id}" in caplog.text
    assert "tokenizer.json" in caplog.text  # the store's error, naming the object


class SilentServer:
    """Accepts connections and never answers: a store that hangs."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self):
        self.socket.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.slow
def test_a_hung_store_holds_neither_the_request_nor_the_event_loop(
    gateway, tenant, s3_deployment, monkeypatch, caplog
):
    gateway.reset(tokenizer_wait_seconds=0.5)
    silent = SilentServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    try:
        started = time.monotonic()
        row = broken_stream(gateway, tenant)
        elapsed = time.monotonic() - started
        # Meanwhile the loop serves other requests: the fetch is on a thread of its own.
        assert httpx.get(gateway.url + "/healthz").status_code == 200
        assert silent.connections  # the fetch did reach the store, and is still waiting
    finally:
        silent.close()
    assert elapsed < 5
    assert row.prompt_tokens == estimate_chat(CHAT)
    assert row.completion_tokens == estimate_text(STREAMED)
    assert "still loading after 0.5s" in caplog.text
