"""Loading models from S3 through boto3, against moto's S3 server on loopback."""

import os
import subprocess
import sys

import boto3
import httpx
import openai
import pytest
from moto.server import ThreadedMotoServer

from runtime.loader import ModelLoadError, resolve_model

pytestmark = pytest.mark.nodb


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _upload(folder, bucket, prefix, *, replace=None):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in folder.iterdir():
        body = (replace or {}).get(path.name, path.read_bytes())
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=body)


def test_downloads_and_verifies_an_s3_model(s3_env, tiny_moe_dir, tmp_path, caplog):
    _upload(tiny_moe_dir, "models", "tiny-moe/v1")
    caplog.set_level("INFO")
    folder = resolve_model("s3://models/tiny-moe/v1", cache_dir=tmp_path)
    for path in tiny_moe_dir.iterdir():
        assert (folder / path.name).read_bytes() == path.read_bytes()
    assert "downloading s3://models/tiny-moe/v1" in caplog.text
    assert "verified 5 files" in caplog.text
    # A second resolve uses the cache (and still verifies it).
    assert resolve_model("s3://models/tiny-moe/v1/", cache_dir=tmp_path) == folder


def test_a_file_that_does_not_match_the_manifest_is_refused(s3_env, tiny_moe_dir, tmp_path):
    config = (tiny_moe_dir / "config.json").read_bytes()
    tampered = config.replace(b'"rms_norm_eps": 1e-05', b'"rms_norm_eps": 2e-05')
    assert len(tampered) == len(config) and tampered != config
    _upload(tiny_moe_dir, "tampered", "tiny-moe", replace={"config.json": tampered})
    with pytest.raises(ModelLoadError, match=r"config\.json: sha256 .* does not match"):
        resolve_model("s3://tampered/tiny-moe", cache_dir=tmp_path)


def test_an_empty_prefix_is_refused(s3_env, tmp_path):
    boto3.client("s3").create_bucket(Bucket="empty")
    with pytest.raises(ModelLoadError, match="no objects under"):
        resolve_model("s3://empty/nothing", cache_dir=tmp_path)


def test_a_local_folder_is_verified_too(tiny_moe_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_moe_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert resolve_model(str(copy)) == copy
    (copy / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: size"):
        resolve_model(str(copy))


@pytest.mark.slow
def test_the_server_serves_a_model_from_s3(s3_env, tiny_moe_dir, tmp_path, launch_runtime):
    _upload(tiny_moe_dir, "served", "tiny-moe/v1")
    runtime = launch_runtime(
        "s3://served/tiny-moe/v1",
        tmp_path / "runtime.log",
        "--download-dir",
        str(tmp_path / "cache"),
        env=s3_env,
    )
    runtime.wait_until_ready()
    client = openai.OpenAI(base_url=f"{runtime.url}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(model="tiny-moe", prompt="Hi", max_tokens=3)
    assert response.usage.completion_tokens >= 1
    assert "downloading s3://served/tiny-moe/v1" in runtime.log()


@pytest.mark.slow
def test_the_server_exits_when_the_model_does_not_verify(
    s3_env, tiny_moe_dir, tmp_path, launch_runtime
):
    weights = bytearray((tiny_moe_dir / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    _upload(tiny_moe_dir, "corrupt", "tiny-moe", replace={"model.safetensors": bytes(weights)})
    runtime = launch_runtime(
        "s3://corrupt/tiny-moe",
        tmp_path / "runtime.log",
        "--download-dir",
        str(tmp_path / "cache"),
        env=s3_env,
    )
    assert runtime.process.wait(timeout=60) == 1
    assert "model.safetensors: sha256" in runtime.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{runtime.url}/health", timeout=2)


def test_the_download_command_fetches_a_verified_folder(s3_env, tiny_moe_dir, tmp_path):
    _upload(tiny_moe_dir, "fetch", "tiny-moe/v2")
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "download", "--model", "s3://fetch/tiny-moe/v2",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, **s3_env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_moe_dir.iterdir())
    (out / "config.json").write_bytes(b"{}")
    # A damaged local copy of the right size would be kept; another size is fetched again.
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "download", "--model", "s3://fetch/tiny-moe/v2",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, **s3_env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").read_bytes() == (tiny_moe_dir / "config.json").read_bytes()
