"""Catalog fixtures: artifact stores (a local folder, and S3 on moto's server over loopback,
from tests/conftest.py) and the tiny MoE checkpoint, built once per session."""

import shutil
from pathlib import Path

import pytest

from catalog.artifacts import LocalArtifactStore, MultipartConfig, S3ArtifactStore, get_store

# S3's smallest part size (every part but the last): tests upload ~11 MiB files in 3 parts.
TEST_MULTIPART = MultipartConfig(threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024)


@pytest.fixture(autouse=True)
def private_var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    settings.ARTIFACT_STORE_URL = ""  # the embedded default: a folder under VAR_DIR


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
