import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from runtime.tiny_moe import build_tiny_moe, sha256_of

pytestmark = pytest.mark.nodb


def test_same_seed_gives_byte_identical_files(tiny_moe_dir, tmp_path):
    again = build_tiny_moe(tmp_path / "again", seed=0)
    names = sorted(p.name for p in tiny_moe_dir.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in names:
        assert (again / name).read_bytes() == (tiny_moe_dir / name).read_bytes(), name


def test_other_seed_changes_only_the_weights(tiny_moe_dir, tmp_path):
    other = build_tiny_moe(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_moe_dir / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_moe_dir / "tokenizer.json").read_bytes()


def test_manifest_lists_every_file_with_size_and_sha256(tiny_moe_dir):
    manifest = json.loads((tiny_moe_dir / "manifest.json").read_text())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {p.name for p in tiny_moe_dir.iterdir()} - {"manifest.json"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        path = tiny_moe_dir / name
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == sha256_of(path)


def test_config_is_a_small_mixtral(tiny_moe_dir):
    config = AutoConfig.from_pretrained(tiny_moe_dir)
    assert config.model_type == "mixtral"
    assert config.num_local_experts == 8
    assert config.num_experts_per_tok == 2
    assert config.max_position_embeddings == 2048
    total_bytes = sum(p.stat().st_size for p in tiny_moe_dir.iterdir())
    assert total_bytes < 10 * 1024 * 1024


def test_weights_use_the_original_mixtral_tensor_names(tiny_moe_dir):
    with safe_open(tiny_moe_dir / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in keys
    assert "lm_head.weight" in keys


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "Grüße aus Köln, ¿qué tal? Ça va.",
        "你好，世界 こんにちは 안녕하세요 مرحبا שלום",  # noqa: RUF001
        "never seen in training: ⛵️🦜 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \t\n\x00 ﷽",  # noqa: RUF001
    ],
)
def test_tokenizer_round_trips_any_utf8(tiny_moe_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_chat_template_and_end_of_turn_token(tiny_moe_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((tiny_moe_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


def test_transformers_generates_from_it(tiny_moe_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert prompt_length < output.shape[1] <= prompt_length + 8
    assert torch.isfinite(model(**inputs).logits).all()


def test_cli_writes_the_same_folder(tiny_moe_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "make-tiny-moe", "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(tmp_path / "cli")
    manifest = (tmp_path / "cli" / "manifest.json").read_bytes()
    assert manifest == (tiny_moe_dir / "manifest.json").read_bytes()
