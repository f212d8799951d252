"""Catalog fixtures: artifact stores (a local folder, and S3 on moto's server over loopback)
and the tiny MoE checkpoint, built once per session."""

import logging
import shutil
import uuid
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from catalog.artifacts import LocalArtifactStore, MultipartConfig, S3ArtifactStore, get_store

# S3's smallest part size (every part but the last): tests upload ~11 MiB files in 3 parts.
TEST_MULTIPART = MultipartConfig(threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024)


@pytest.fixture(autouse=True)
def private_var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    settings.ARTIFACT_STORE_URL = ""  # the embedded default: a folder under VAR_DIR


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on a free loopback port, for the whole session."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, moto_endpoint):
    """What an operator sets for an S3-compatible store; boto3 reads it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_bucket(aws_env):
    bucket = f"sirocco-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(s3_bucket, settings, tmp_path):
    """An S3 store on moto with 5 MiB parts; also what get_store() returns in the test."""
    settings.ARTIFACT_STORE_URL = f"s3://{s3_bucket}/artifacts"
    return S3ArtifactStore(
        s3_bucket, "artifacts", multipart=TEST_MULTIPART, state_dir=tmp_path / "upload-state"
    )


@pytest.fixture
def local_store(tmp_path):
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def default_store():
    """The store get_store() gives in these tests (a folder in the test's VAR_DIR)."""
    return get_store()


@pytest.fixture(scope="session")
def tiny_checkpoint_template(tmp_path_factory) -> Path:
    from runtime.tiny_moe import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_template, tmp_path) -> Path:
    """A private copy of the tiny MoE folder, free to damage."""
    return Path(shutil.copytree(tiny_checkpoint_template, tmp_path / "tiny-moe"))
