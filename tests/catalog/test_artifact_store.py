"""The artifact store, on a local folder and on S3 (moto's server over loopback)."""

import hashlib
import os

import boto3
import httpx
import pytest

from catalog.artifacts import ArtifactStoreError, sha256_of_file, store_from_url

pytestmark = pytest.mark.nodb


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_get_list_stat_and_delete(store, tmp_path):
    source = write(tmp_path / "in" / "config.json", b'{"model_type": "mixtral"}')
    digest = sha256_of_file(source)
    stored = store.put_file("models/m/v1/config.json", source, sha256=digest)
    assert stored.size == source.stat().st_size
    store.put_bytes("models/m/v1/sub/tokenizer.json", b"{}")
    store.put_bytes("models/m/v10/other.json", b"x")

    assert store.stat("models/m/v1/config.json").sha256 == digest
    assert store.stat("models/m/v1/missing.json") is None
    assert [o.key for o in store.list("models/m/v1/")] == [
        "models/m/v1/config.json",
        "models/m/v1/sub/tokenizer.json",
    ]
    out = tmp_path / "out" / "config.json"
    store.get_file("models/m/v1/config.json", out)
    assert out.read_bytes() == source.read_bytes()
    assert store.read_bytes("models/m/v1/sub/tokenizer.json") == b"{}"
    assert store.compute_sha256("models/m/v1/config.json") == digest

    store.delete("models/m/v1/config.json")
    assert store.stat("models/m/v1/config.json") is None


def test_keys_cannot_escape_the_store(store):
    for key in ("../etc/passwd", "/abs", "a/../../b", ""):
        with pytest.raises(ArtifactStoreError, match="not a valid artifact key"):
            store.stat(key)


def test_a_corrupted_object_is_detected_by_rehashing(store, tmp_path):
    source = write(tmp_path / "shard.safetensors", os.urandom(4096))
    digest = sha256_of_file(source)
    store.put_file("models/m/v1/shard.safetensors", source, sha256=digest)
    damaged = bytearray(source.read_bytes())
    damaged[100] ^= 0xFF
    if hasattr(store, "root"):
        (store.root / "models/m/v1/shard.safetensors").write_bytes(bytes(damaged))
    else:  # rewrite the object behind the store's back, keeping its recorded digest
        store.client.put_object(
            Bucket=store.bucket,
            Key="artifacts/models/m/v1/shard.safetensors",
            Body=bytes(damaged),
            Metadata={"sha256": digest},
        )
    assert store.stat("models/m/v1/shard.safetensors").sha256 == digest  # the record is stale
    assert store.compute_sha256("models/m/v1/shard.safetensors") != digest


def test_presigned_url_downloads_without_credentials(s3_store, tmp_path):
    s3_store.put_bytes("models/m/v1/config.json", b"hello weights")
    url = s3_store.presigned_url("models/m/v1/config.json", expires_in=60)
    assert "Signature" in url or "X-Amz-Signature" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"hello weights"


def test_local_presigned_url_is_a_file_url(local_store):
    local_store.put_bytes("models/m/v1/a.bin", b"1")
    assert local_store.presigned_url("models/m/v1/a.bin").startswith("file:///")


def test_large_files_go_up_in_parts(s3_store, tmp_path):
    data = os.urandom(11 * 1024 * 1024)  # three parts: 5 + 5 + 1 MiB
    source = write(tmp_path / "big.safetensors", data)
    seen = []
    s3_store.put_file(
        "models/m/v1/big.safetensors", source, sha256=sha256_of_file(source), progress=seen.append
    )
    head = s3_store.client.head_object(
        Bucket=s3_store.bucket, Key="artifacts/models/m/v1/big.safetensors"
    )
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert sum(seen) == len(data)
    assert (
        s3_store.compute_sha256("models/m/v1/big.safetensors") == hashlib.sha256(data).hexdigest()
    )
    assert not list((tmp_path / "upload-state").glob("*.json"))  # state removed on completion


class Interrupted(Exception):
    pass


def test_an_interrupted_multipart_upload_resumes_without_resending_parts(s3_store, tmp_path):
    data = os.urandom(11 * 1024 * 1024)
    source = write(tmp_path / "big.safetensors", data)
    digest = sha256_of_file(source)
    store = s3_store.__class__(
        s3_store.bucket,
        s3_store.prefix,
        multipart=s3_store.multipart.__class__(
            threshold=s3_store.multipart.threshold,
            part_size=s3_store.multipart.part_size,
            max_concurrency=1,
        ),
        state_dir=s3_store.state_dir,
    )
    sent_parts = []
    failing = {3}  # the connection drops while part 3 goes up

    def record(params, **kwargs):
        if params["PartNumber"] in failing:
            failing.clear()
            raise Interrupted
        sent_parts.append(params["PartNumber"])

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", record)

    with pytest.raises(Interrupted):
        store.put_file("models/m/v1/big.safetensors", source, sha256=digest)
    assert sent_parts == [1, 2]
    assert store.stat("models/m/v1/big.safetensors") is None  # not completed
    assert len(list(store.state_dir.glob("*.json"))) == 1

    sent_parts.clear()
    resumed = []
    store.put_file("models/m/v1/big.safetensors", source, sha256=digest, progress=resumed.append)
    assert sent_parts == [3]  # parts 1 and 2 were already on the server
    assert sum(resumed) == len(data)
    assert store.compute_sha256("models/m/v1/big.safetensors") == digest
    assert store.stat("models/m/v1/big.safetensors").sha256 == digest


def test_a_changed_file_does_not_resume_a_stale_upload(s3_store, tmp_path):
    source = write(tmp_path / "big.safetensors", os.urandom(11 * 1024 * 1024))
    sent = []
    s3_store.client.meta.events.register(
        "before-parameter-build.s3.UploadPart",
        lambda params, **kw: sent.append(params["PartNumber"]),
    )

    def stop(amount):
        raise Interrupted

    with pytest.raises(Interrupted):
        s3_store.put_file(
            "models/m/v1/big.safetensors", source, sha256=sha256_of_file(source), progress=stop
        )
    source.write_bytes(os.urandom(11 * 1024 * 1024))  # new content under the same name
    sent.clear()
    digest = sha256_of_file(source)
    s3_store.put_file("models/m/v1/big.safetensors", source, sha256=digest)
    assert sorted(sent) == [1, 2, 3]
    assert s3_store.compute_sha256("models/m/v1/big.safetensors") == digest


def test_store_urls(tmp_path, aws_env):
    assert store_from_url(tmp_path.as_uri()).root == tmp_path
    s3 = store_from_url("s3://bucket/some/prefix")
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri("models/m/v1/") == "s3://bucket/some/prefix/models/m/v1"
    for bad in ("ftp://x/y", "s3:///nobucket", "file://host/path"):
        with pytest.raises(ArtifactStoreError):
            store_from_url(bad)


def test_errors_name_the_object(s3_store):
    missing = s3_store.__class__("no-such-bucket-" + "x" * 8, "p")
    with pytest.raises(ArtifactStoreError, match="s3://no-such-bucket-"):
        missing.put_bytes("models/a", b"1")
    assert boto3  # boto3 reads AWS_ENDPOINT_URL: the store above talked to moto, not AWS
