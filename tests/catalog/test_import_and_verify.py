"""catalog_import, catalog_verify and make_tiny_moe, on the local store and on S3 (moto)."""

import io
import json
import math

import pytest
from django.core.management import CommandError, call_command
from safetensors import safe_open

from accounts.models import AuditLogEntry
from catalog.artifacts import get_store
from catalog.models import DedicatedPrice, Model, ModelArtifact, ModelVersion, TokenPrice
from catalog.permissions import operator_system_actor
from catalog.services import model_version_import
from catalog.tiny import TINY_SLUG, ensure_tiny_moe
from controlplane.errors import Conflict
from runtime import tiny_moe
from tests.catalog.factories import BuiltinRuntimeFactory, ModelFactory, ModelVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiny_model(db):
    BuiltinRuntimeFactory()
    return ModelFactory(
        slug="tiny", moe=True, total_parameters=2_000_000, active_parameters=1_000_000
    )


def run(*args):
    out = io.StringIO()
    call_command(*args, "--no-progress", stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_import_uploads_every_file_with_a_manifest_the_runtime_can_check(
    request, store_kind, tiny_model, tiny_checkpoint
):
    if store_kind == "s3":
        request.getfixturevalue("s3_store")
    out = run(
        "catalog_import",
        "--from",
        str(tiny_checkpoint),
        "--model",
        "tiny",
        "--version",
        "v1",
        "--runtime",
        "builtin",
        "--publish",
    )
    version = ModelVersion.objects.get(model=tiny_model, version="v1")
    assert version.status == "published" and "published" in out
    store = get_store()
    assert version.artifact_uri == store.uri("models/tiny/v1")
    assert version.artifact_uri.startswith("s3://" if store_kind == "s3" else "/")
    rows = {a.path: a for a in version.artifacts.all()}
    assert set(rows) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert version.size_bytes == sum(a.size_bytes for a in rows.values())
    assert version.dtype == "float32"

    manifest = json.loads(store.read_bytes("models/tiny/v1/manifest.json"))
    # Exactly the manifest build_tiny_moe writes, which runtime/loader.py verifies downloads by.
    assert manifest == json.loads((tiny_checkpoint / "manifest.json").read_text())
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == {
        p: a.sha256 for p, a in rows.items()
    }
    assert {o.key.rsplit("/", 1)[1] for o in store.list("models/tiny/v1/")} == {
        *rows,
        "manifest.json",
    }
    assert "ok     model.safetensors" in run("catalog_verify", "--model", "tiny")


def test_reimporting_the_same_folder_changes_nothing(tiny_model, tiny_checkpoint):
    args = (
        "catalog_import",
        "--from",
        str(tiny_checkpoint),
        "--model",
        "tiny",
        "--version",
        "v1",
        "--runtime",
        "builtin",
        "--publish",
    )
    run(*args)
    before = list(ModelArtifact.objects.values_list("pk", "sha256"))
    audits = AuditLogEntry.objects.count()
    run(*args)
    assert list(ModelArtifact.objects.values_list("pk", "sha256")) == before
    assert AuditLogEntry.objects.count() == audits


def test_published_weights_never_change(tiny_model, tiny_checkpoint, tmp_path):
    run(
        "catalog_import",
        "--from",
        str(tiny_checkpoint),
        "--model",
        "tiny",
        "--version",
        "v1",
        "--runtime",
        "builtin",
        "--publish",
    )
    (tiny_checkpoint / "extra.txt").write_text("new file")
    version = ModelVersion.objects.get(version="v1")
    with pytest.raises(Conflict, match="Create a new version"):
        model_version_import(actor=operator_system_actor(), version=version, source=tiny_checkpoint)


def test_a_folder_without_config_json_is_refused_and_nothing_is_created(
    tiny_model, tiny_checkpoint
):
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(CommandError, match=r"has no config\.json"):
        run("catalog_import", "--from", str(tiny_checkpoint), "--model", "tiny", "--version", "v1")
    assert not ModelVersion.objects.exists()


def test_a_truncated_shard_is_refused_and_the_version_stays_unpublished(
    tiny_model, tiny_checkpoint
):
    draft = ModelVersionFactory(
        model=tiny_model, version="v1", status="draft", serving_runtime=BuiltinRuntimeFactory()
    )
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CommandError, match=r"model.safetensors is corrupted: .*truncated"):
        run(
            "catalog_import",
            "--from",
            str(tiny_checkpoint),
            "--model",
            "tiny",
            "--version",
            "v1",
            "--publish",
        )
    draft.refresh_from_db()
    assert draft.status == "draft" and draft.artifact_uri == ""
    assert not draft.artifacts.exists()
    assert get_store().list("models/") == []


def test_a_damaged_shard_is_caught_by_the_folders_manifest(tiny_model, tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, header intact: only the checksum notices
    weights.write_bytes(bytes(data))
    with pytest.raises(CommandError, match=r"model\.safetensors: sha256 differs"):
        run(
            "catalog_import",
            "--from",
            str(tiny_checkpoint),
            "--model",
            "tiny",
            "--version",
            "v1",
            "--publish",
        )
    assert not ModelVersion.objects.filter(status="published").exists()


def test_import_needs_a_known_model(tiny_checkpoint, db):
    with pytest.raises(CommandError, match="No model 'nope'"):
        run("catalog_import", "--from", str(tiny_checkpoint), "--model", "nope", "--version", "v1")


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_verify_reports_each_corrupted_or_missing_file(
    request, store_kind, tiny_model, tiny_checkpoint
):
    if store_kind == "s3":
        request.getfixturevalue("s3_store")
    run(
        "catalog_import",
        "--from",
        str(tiny_checkpoint),
        "--model",
        "tiny",
        "--version",
        "v1",
        "--runtime",
        "builtin",
    )
    store = get_store()
    damaged = bytearray(store.read_bytes("models/tiny/v1/model.safetensors"))
    damaged[5000] ^= 0x01
    store.put_bytes("models/tiny/v1/model.safetensors", bytes(damaged))
    store.delete("models/tiny/v1/tokenizer.json")
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"2 file\(s\) failed verification"):
        call_command("catalog_verify", "--no-progress", stdout=out, stderr=io.StringIO())
    report = out.getvalue()
    assert "FAILED model.safetensors: sha256 " in report and "(corrupted)" in report
    assert "FAILED tokenizer.json: missing from the store" in report
    assert "ok     config.json" in report


def test_make_tiny_moe_out_only_writes_the_folder(tmp_path, db):
    out = io.StringIO()
    call_command("make_tiny_moe", "--out", str(tmp_path / "tiny"), stdout=out)
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["num_local_experts"] == 8
    assert not Model.objects.exists()


def test_make_tiny_moe_publishes_mixtral_tiny_once(db):
    call_command("make_tiny_moe", stdout=io.StringIO(), stderr=io.StringIO())
    call_command("make_tiny_moe", stdout=io.StringIO(), stderr=io.StringIO())
    model = Model.objects.get(slug=TINY_SLUG)
    assert (model.architecture, model.num_experts, model.experts_per_token) == ("moe", 8, 2)
    assert model.context_length == 2048
    # Counted from the checkpoint; each token skips 6 of the 8 experts' weights.
    weights = get_store().uri("models/mixtral-tiny/v1") + "/model.safetensors"
    with safe_open(weights, framework="pt") as tensors:
        total = sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
    experts = (
        tiny_moe.NUM_LAYERS
        * tiny_moe.NUM_EXPERTS
        * 3
        * tiny_moe.HIDDEN_SIZE
        * tiny_moe.INTERMEDIATE_SIZE
    )
    assert model.total_parameters == total
    assert model.active_parameters == total - experts * 6 // 8
    version = model.versions.get()
    assert version.status == "published" and version.serving_runtime.name == "builtin"
    assert version.artifacts.count() == 5
    assert TokenPrice.objects.filter(model_version=version).count() == 1
    price = DedicatedPrice.objects.get(model_version=version)
    assert price.hardware_profile.name == "cpu-small"
    assert ensure_tiny_moe() == version


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_the_runtime_loads_what_was_imported_and_refuses_a_damaged_copy(
    request, store_kind, tiny_model, tiny_checkpoint, tmp_path
):
    from runtime.loader import ModelLoadError, resolve_model

    if store_kind == "s3":
        request.getfixturevalue("s3_store")
    run(
        "catalog_import",
        "--from",
        str(tiny_checkpoint),
        "--model",
        "tiny",
        "--version",
        "v1",
        "--runtime",
        "builtin",
        "--publish",
    )
    uri = ModelVersion.objects.get(version="v1").artifact_uri
    folder = resolve_model(uri, cache_dir=tmp_path / "cache")  # downloads s3:// URIs
    assert (folder / "model.safetensors").read_bytes() == (
        tiny_checkpoint / "model.safetensors"
    ).read_bytes()

    store = get_store()
    damaged = bytearray(store.read_bytes("models/tiny/v1/config.json"))
    damaged[0:1] = b" "
    store.put_bytes("models/tiny/v1/config.json", bytes(damaged))
    with pytest.raises(ModelLoadError, match=r"config\.json: sha256"):
        resolve_model(uri, cache_dir=tmp_path / "fresh-cache")
