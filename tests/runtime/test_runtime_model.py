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


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-5)


def _table(first: int, length: int, block_size: int = 16) -> list[int]:
    """A block table of consecutive blocks from `first` for `length` positions."""
    return list(range(first, first + -(-length // block_size)))


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_prefill_and_decode_match_transformers(loaded, batch_invariant):
    spec, weights, reference = loaded
    runner = MixtralRunner(
        spec, weights, max_num_seqs=2, max_model_len=128, batch_invariant=batch_invariant
    )
    tokens = _prompt(29, spec.vocab_size, seed=3)
    table = [5, 2, 9]  # blocks anywhere in the cache, in any order
    logits = runner.prefill(table, tokens)
    for _ in range(4):
        with torch.no_grad():
            expected = reference(torch.tensor([tokens])).logits[0, -1]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        tokens.append(int(logits.argmax()))
        logits = runner.decode([tokens[-1]], [len(tokens) - 1], [table])[0]


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_a_cached_prefix_gives_the_same_logits_bit_for_bit(loaded, batch_invariant):
    # Prompt B shares its first 3 blocks with prompt A: B's prefill over A's blocks computes
    # only the rest, and its logits (and those of the decode steps after) are the same bits as
    # B computed whole in blocks of its own (on CPU; the GPU path promises the same numbers).
    same = torch.equal if batch_invariant else _close
    spec, weights, reference = loaded
    runner = MixtralRunner(
        spec, weights, max_num_seqs=4, max_model_len=128, batch_invariant=batch_invariant
    )
    a = _prompt(70, spec.vocab_size, seed=1)
    b = a[:50] + _prompt(23, spec.vocab_size, seed=2)
    runner.prefill(_table(1, len(a)), a)
    shared = _table(1, len(a))[:3]
    hit_table = [*shared, 20, 21]
    hit = runner.prefill(hit_table, b, start=48)
    whole_table = _table(10, len(b))
    whole = runner.prefill(whole_table, b)
    assert same(hit, whole)
    with torch.no_grad():
        expected = reference(torch.tensor([b])).logits[0, -1]
    torch.testing.assert_close(hit, expected, rtol=0, atol=1e-4)
    token = int(hit.argmax())
    for position in range(len(b), len(b) + 3):
        from_hit = runner.decode([token], [position], [hit_table])[0]
        from_whole = runner.decode([token], [position], [whole_table])[0]
        assert same(from_hit, from_whole), position
        token = int(from_hit.argmax())


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_prefills_sharing_a_pass_give_the_logits_of_each_alone(loaded, batch_invariant):
    # Three prompts in one prefill pass, one of them over a cached prefix: each one's logits
    # (and the cache entries its decode steps read) are those of its prefill alone.
    same = torch.equal if batch_invariant else _close
    spec, weights, _ = loaded
    runner = MixtralRunner(
        spec,
        weights,
        max_num_seqs=4,
        max_model_len=128,
        batch_invariant=batch_invariant,
        num_blocks=80,
    )
    shared = _prompt(40, spec.vocab_size, seed=5)
    prompts = [shared + _prompt(9, spec.vocab_size, seed=6), _prompt(3, spec.vocab_size, seed=7)]
    prompts.append(_prompt(70, spec.vocab_size, seed=8))
    runner.prefill(_table(1, 48), shared + [0] * 8)  # the first 2 blocks (32 tokens) cached
    tables = [[1, 2, 20, 21], _table(30, 3), _table(40, 70)]
    together = runner.prefill_batch(
        [(tables[0], prompts[0], 32), (tables[1], prompts[1], 0), (tables[2], prompts[2], 0)]
    )
    for row, prompt in enumerate(prompts):
        alone_table = _table(60, len(prompt))
        alone = runner.prefill(alone_table, prompt)
        assert same(together[row], alone), row
        after = runner.decode([7], [len(prompt)], [tables[row]])[0]
        assert same(after, runner.decode([7], [len(prompt)], [alone_table])[0]), row


def test_decode_logits_are_bitwise_independent_of_the_batch(loaded):
    spec, weights, _ = loaded
    runner = MixtralRunner(
        spec, weights, max_num_seqs=16, max_model_len=128, batch_invariant=True, num_blocks=300
    )
    prompts = [_prompt(1 + (7 * i) % 50, spec.vocab_size, seed=i) for i in range(16)]
    tables = [_table(1 + 8 * i, 128) for i in range(16)]
    steps = 6

    def alone(prompt):
        table = _table(200, 128)
        logits = [runner.prefill(table, prompt)]
        for step in range(steps):
            next_token = int(logits[-1].argmax())
            logits.append(runner.decode([next_token], [len(prompt) + step], [table])[0])
        return logits

    solo = [alone(prompt) for prompt in prompts]
    batched = [[runner.prefill(table, p)] for table, p in zip(tables, prompts, strict=True)]
    for step in range(steps):
        next_tokens = [int(logits[-1].argmax()) for logits in batched]
        step_logits = runner.decode(next_tokens, [len(p) + step for p in prompts], tables)
        for row in range(len(prompts)):
            batched[row].append(step_logits[row])
    for row in range(len(prompts)):
        for step in range(steps + 1):
            assert torch.equal(batched[row][step], solo[row][step]), (row, step)


def test_batched_decode_of_the_gpu_path_matches_each_sequence_alone(loaded):
    # The CUDA path (batch_invariant=False): one masked GQA attention over sequences of
    # different lengths gathered from their blocks, experts as unpadded grouped GEMMs. Not
    # bitwise, but the same numbers.
    spec, weights, _ = loaded
    runner = MixtralRunner(spec, weights, max_num_seqs=4, max_model_len=128, batch_invariant=False)
    prompts = [_prompt(length, spec.vocab_size, seed=length) for length in (3, 40, 17, 70)]
    tables = [_table(1 + 8 * row, 128) for row in range(4)]
    alone = []
    for prompt in prompts:
        runner.prefill(tables[0], prompt)
        alone.append(runner.decode([9], [len(prompt)], [tables[0]])[0])
    for table, prompt in zip(tables, prompts, strict=True):
        runner.prefill(table, prompt)
    together = runner.decode([9] * 4, [len(p) for p in prompts], tables)
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
