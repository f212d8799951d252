"""Our Mixtral forward pass against transformers', and its batch invariance on CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.model import MixtralRunner, load_mixtral

pytestmark = pytest.mark.nodb

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_moe_dir):
    spec, weights = load_mixtral(tiny_moe_dir, dtype=torch.float32, device=CPU)
    reference = AutoModelForCausalLM.from_pretrained(tiny_moe_dir).eval()
    return spec, weights, reference


def _prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_prefill_and_decode_match_transformers(loaded, batch_invariant):
    spec, weights, reference = loaded
    runner = MixtralRunner(
        spec, weights, max_num_seqs=2, max_model_len=128, batch_invariant=batch_invariant
    )
    tokens = _prompt(29, spec.vocab_size, seed=3)
    logits = runner.prefill(1, tokens)
    for _ in range(4):
        with torch.no_grad():
            expected = reference(torch.tensor([tokens])).logits[0, -1]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        tokens.append(int(logits.argmax()))
        # decode works on rows 0..n-1; put the sequence in row 0 first
        runner.move_row(1, 0, len(tokens) - 1)
        logits = runner.decode([tokens[-1]], [len(tokens) - 1])[0]
        runner.move_row(0, 1, len(tokens))


def test_decode_logits_are_bitwise_independent_of_the_batch(loaded):
    spec, weights, _ = loaded
    runner = MixtralRunner(spec, weights, max_num_seqs=16, max_model_len=128, batch_invariant=True)
    prompts = [_prompt(1 + (7 * i) % 50, spec.vocab_size, seed=i) for i in range(16)]
    steps = 6

    def alone(prompt):
        logits = [runner.prefill(0, prompt)]
        for step in range(steps):
            next_token = int(logits[-1].argmax())
            logits.append(runner.decode([next_token], [len(prompt) + step])[0])
        return logits

    solo = [alone(prompt) for prompt in prompts]
    batched = [[runner.prefill(row, prompt)] for row, prompt in enumerate(prompts)]
    for step in range(steps):
        next_tokens = [int(logits[-1].argmax()) for logits in batched]
        step_logits = runner.decode(next_tokens, [len(p) + step for p in prompts])
        for row in range(len(prompts)):
            batched[row].append(step_logits[row])
    for row in range(len(prompts)):
        for step in range(steps + 1):
            assert torch.equal(batched[row][step], solo[row][step]), (row, step)


def test_batched_decode_of_the_gpu_path_matches_each_sequence_alone(loaded):
    # The CUDA path (batch_invariant=False): one masked GQA attention over rows of different
    # lengths, experts as unpadded grouped GEMMs. Not bitwise, but the same numbers.
    spec, weights, _ = loaded
    runner = MixtralRunner(spec, weights, max_num_seqs=4, max_model_len=128, batch_invariant=False)
    prompts = [_prompt(length, spec.vocab_size, seed=length) for length in (3, 40, 17, 70)]
    alone = []
    for prompt in prompts:
        runner.prefill(0, prompt)
        alone.append(runner.decode([9], [len(prompt)])[0])
    for row, prompt in enumerate(prompts):
        runner.prefill(row, prompt)
    together = runner.decode([9] * 4, [len(p) for p in prompts])
    for row in range(4):
        torch.testing.assert_close(together[row], alone[row], rtol=0, atol=1e-4)


def test_weights_read_from_safetensors_are_transformers_weights_bit_for_bit(loaded):
    # load_mixtral reads the files itself (transformers' loader was most of the cold start);
    # every tensor must be the one transformers builds from the same checkpoint.
    spec, weights, reference = loaded
    model = reference.model
    assert torch.equal(weights.embed, model.embed_tokens.weight)
    assert torch.equal(weights.final_norm, model.norm.weight)
    assert torch.equal(weights.lm_head, reference.lm_head.weight)
    assert len(weights.layers) == len(model.layers) == spec.num_layers
    for ours, theirs in zip(weights.layers, model.layers, strict=True):
        attention = theirs.self_attn
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(ours.qkv, qkv)
        assert torch.equal(ours.o_proj, attention.o_proj.weight)
        assert torch.equal(ours.input_norm, theirs.input_layernorm.weight)
        assert torch.equal(ours.post_attention_norm, theirs.post_attention_layernorm.weight)
        assert torch.equal(ours.router, theirs.mlp.gate.weight)
        assert torch.equal(ours.gate_up, theirs.mlp.experts.gate_up_proj)
        assert torch.equal(ours.down, theirs.mlp.experts.down_proj)


def test_fused_sharded_checkpoints_load_the_same_weights(loaded, tiny_moe_dir, tmp_path):
    # transformers 5 layout (fused experts under mlp.) split over two files with an index.
    import json
    import shutil

    from safetensors.torch import save_file

    spec, weights, _ = loaded
    shutil.copy(tiny_moe_dir / "config.json", tmp_path / "config.json")
    first, second = {}, {}
    for index, layer in enumerate(weights.layers):
        prefix = f"model.layers.{index}"
        q, k, v = layer.qkv.split(
            [spec.num_heads * spec.head_dim, *[spec.num_kv_heads * spec.head_dim] * 2]
        )
        first |= {
            f"{prefix}.self_attn.q_proj.weight": q.clone(),
            f"{prefix}.self_attn.k_proj.weight": k.clone(),
            f"{prefix}.self_attn.v_proj.weight": v.clone(),
            f"{prefix}.self_attn.o_proj.weight": layer.o_proj,
            f"{prefix}.input_layernorm.weight": layer.input_norm,
            f"{prefix}.post_attention_layernorm.weight": layer.post_attention_norm,
        }
        second |= {
            f"{prefix}.mlp.gate.weight": layer.router,
            f"{prefix}.mlp.experts.gate_up_proj": layer.gate_up,
            f"{prefix}.mlp.experts.down_proj": layer.down,
        }
    first |= {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    second |= {"lm_head.weight": weights.lm_head}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    fused_spec, fused = load_mixtral(tmp_path, dtype=torch.float32, device=CPU)
    assert fused_spec == spec
    assert torch.equal(fused.embed, weights.embed)
    assert torch.equal(fused.lm_head, weights.lm_head)
    for ours, theirs in zip(fused.layers, weights.layers, strict=True):
        for name in ("qkv", "o_proj", "input_norm", "post_attention_norm", "router"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert torch.equal(ours.gate_up, theirs.gate_up)
        assert torch.equal(ours.down, theirs.down)


def test_config_defaults_follow_transformers(tiny_moe_dir, tmp_path):
    # Fields a config.json leaves out take MixtralConfig's defaults, as with AutoConfig.
    import json

    from transformers import AutoConfig

    from runtime.model import ModelSpec, read_mixtral_config

    raw = json.loads((tiny_moe_dir / "config.json").read_text())
    for name in ("rms_norm_eps", "max_position_embeddings", "num_key_value_heads", "head_dim"):
        raw.pop(name, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = ModelSpec.from_hf_config(read_mixtral_config(tmp_path))
    assert ours == ModelSpec.from_hf_config(AutoConfig.from_pretrained(tmp_path))
    assert ModelSpec.from_hf_config(read_mixtral_config(tiny_moe_dir)) == ModelSpec.from_hf_config(
        AutoConfig.from_pretrained(tiny_moe_dir)
    )
