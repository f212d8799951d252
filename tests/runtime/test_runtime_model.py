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
