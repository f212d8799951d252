"""The paged KV cache and automatic prefix caching: the block manager's bookkeeping, and the
engine over the tiny MoE with a real runner (cache hits never change greedy output; memory
pressure evicts and preempts, never fails a request)."""

import pytest
import torch

from runtime.block_manager import BlockManager, block_hashes
from runtime.engine import Engine, EngineListener, SamplingParams
from runtime.model import MixtralRunner, load_mixtral

pytestmark = pytest.mark.nodb

BLOCK = 4


def _keys(tokens):
    return block_hashes(tokens, BLOCK)


def test_keys_name_the_whole_prefix():
    a = _keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # full blocks only
    # The same second block after another first block is another key.
    assert _keys([0, 2, 3, 4, 5, 6, 7, 8])[1] != a[1]
    assert _keys([1, 2, 3, 4, 5, 6, 7, 8]) == a
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK, start=1, parent=a[0]) == a[1:]


def test_shared_blocks_are_reference_counted():
    manager = BlockManager(10, BLOCK)
    prompt = list(range(12))
    table, cached = manager.allocate(_keys(prompt), len(prompt))
    assert cached == 0 and len(table) == 3
    manager.publish(table, _keys(prompt))
    # A second prompt with the same first 8 tokens reuses 2 blocks; its last block is its own.
    other = [*prompt[:8], 99, 98]
    second, cached = manager.allocate(_keys(other), len(other))
    assert cached == 8 and second[:2] == table[:2] and second[2] not in table
    # A prompt that is all cached full blocks still computes its last block.
    again, cached = manager.allocate(_keys(prompt), len(prompt))
    assert cached == 8 and again[:2] == table[:2]
    manager.free(table)
    manager.free(second)
    manager.free(again)
    assert manager.usage == 0.0
    # Freed blocks keep their keys until handed out again.
    _, cached = manager.allocate(_keys(prompt), len(prompt))
    assert cached == 8


def test_eviction_is_least_recently_freed_first_tail_first():
    manager = BlockManager(7, BLOCK)  # 6 usable blocks
    old, recent = list(range(100, 108)), list(range(200, 208))
    for prompt in (old, recent):
        table, _ = manager.allocate(_keys(prompt), len(prompt) + 1)
        manager.publish(table, _keys(prompt))
        manager.free(table)
    # 4 fresh blocks: the 3 blocks of `old` (freed first) go, then the tail block of `recent`.
    fresh = list(range(300, 316))
    table, cached = manager.allocate(_keys(fresh), len(fresh))
    assert cached == 0 and len(table) == 4
    assert manager.cached_prefix(_keys(old), len(old) + 1) == []
    assert len(manager.cached_prefix(_keys(recent), len(recent) + 1)) == 2
    # Too few free blocks: nothing is taken.
    assert manager.allocate(_keys(list(range(400, 420))), 20) is None
    assert manager.usage == pytest.approx(4 / 6)


# ---- the engine over a real runner ----


@pytest.fixture(scope="module")
def tiny(tiny_moe_dir):
    return load_mixtral(tiny_moe_dir, dtype=torch.float32, device=torch.device("cpu"))


class Counting(EngineListener):
    def __init__(self):
        self.queried = self.hits = self.preemptions = 0
        self.peak_usage = 0.0

    def on_prefix_cache(self, *, queried_tokens, hit_tokens):
        self.queried += queried_tokens
        self.hits += hit_tokens

    def on_preemption(self):
        self.preemptions += 1

    def on_step(self, *, running, waiting, kv_cache_usage):
        self.peak_usage = max(self.peak_usage, kv_cache_usage)


def _engine(tiny, *, num_blocks=None, caching=True, max_num_seqs=8, listener=None):
    spec, weights = tiny
    runner = MixtralRunner(
        spec,
        weights,
        max_num_seqs=max_num_seqs,
        max_model_len=512,
        batch_invariant=True,
        num_blocks=num_blocks,
    )
    return Engine(
        runner,
        lambda ids: " ".join(map(str, ids)),
        eos_token_ids=[],
        enable_prefix_caching=caching,
        listener=listener,
    )


def _run(engine, prompts, max_tokens=12, *, together=True):
    """Greedy token outputs (as the engine's text) and the last event of each request."""
    finished = {}

    def submit(index):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        events = []
        engine.submit(str(index), prompts[index], params, events.append)
        finished[index] = events

    if together:
        for index in range(len(prompts)):
            submit(index)
        while engine.step():
            pass
    else:
        for index in range(len(prompts)):
            submit(index)
            while engine.step():
                pass
    outputs = []
    for index in range(len(prompts)):
        events = finished[index]
        assert events[-1].finish_reason == "length", events[-1]
        outputs.append(("".join(e.text for e in events), events[-1]))
    return outputs


def _conversations(vocab, count=6, system=70):
    generator = torch.Generator().manual_seed(7)
    shared = torch.randint(0, vocab, (system,), generator=generator).tolist()
    return [
        shared + torch.randint(0, vocab, (5 + 9 * i,), generator=generator).tolist()
        for i in range(count)
    ]


def test_cache_hits_do_not_change_greedy_outputs(tiny):
    spec, _ = tiny
    prompts = _conversations(spec.vocab_size)
    uncached = _run(_engine(tiny, caching=False), prompts, together=False)
    listener = Counting()
    engine = _engine(tiny, listener=listener)
    warm = _run(engine, prompts[:1])  # the shared system prompt is now cached
    alone = _run(engine, prompts, together=False)
    together = _run(engine, prompts)  # under load, every prompt's own blocks cached too
    assert [text for text, _ in warm] == [uncached[0][0]]
    assert [text for text, _ in alone] == [text for text, _ in uncached]
    assert [text for text, _ in together] == [text for text, _ in uncached]
    # The shared 70 tokens are 4 full blocks of 16 (64 tokens) on the second request on.
    assert [event.cached_tokens for _, event in alone] == [64] * len(prompts)
    assert all(event.cached_tokens >= 64 for _, event in together)
    assert all(event.cached_tokens == 0 for _, event in uncached)
    assert listener.hits == sum(e.cached_tokens for _, e in warm + alone + together)
    assert listener.queried == 2 * sum(map(len, prompts)) + len(prompts[0])


def test_memory_pressure_evicts_and_preempts_without_failing_anyone(tiny):
    spec, _ = tiny
    prompts = _conversations(spec.vocab_size, count=8, system=40)
    # 12 usable blocks of 16 tokens: 8 prompts of 45-108 tokens plus 40 generated tokens each
    # cannot all be in the cache at once.
    listener = Counting()
    engine = _engine(tiny, num_blocks=13, listener=listener)
    outputs = _run(engine, prompts, max_tokens=40)
    assert all(event.completion_tokens == 40 for _, event in outputs)
    assert listener.preemptions > 0
    assert listener.peak_usage == 1.0
    assert engine.blocks.usage == 0.0  # nothing leaked
    # Eviction: the cache holds at most 12 blocks of keys, and the shared prefix is still
    # served after all that traffic.
    again = _run(engine, prompts[:1], max_tokens=4)
    assert again[0][1].cached_tokens == 32


def test_a_request_that_can_never_fit_is_refused(tiny):
    engine = _engine(tiny, num_blocks=5)  # 64 tokens
    with pytest.raises(ValueError, match="KV cache"):
        engine.submit("big", list(range(60)), SamplingParams(max_tokens=10), lambda event: None)


def test_newcomers_are_prefilled_in_groups_and_a_shared_prefix_is_computed_once(tiny):
    """Six conversations with one uncached system prompt arrive at once. The first pass computes
    the prompt once (the others do not compute it again beside it); the next passes read it
    from the cache, four newcomers to a pass, all in the same engine step: every request has its
    first token after one step, in three forward passes, and greedy outputs are those of each
    request alone without the cache."""
    spec, _ = tiny
    prompts = _conversations(spec.vocab_size)
    uncached = _run(_engine(tiny, caching=False), prompts, together=False)
    listener = Counting()
    engine = _engine(tiny, listener=listener)
    passes = []
    prefill_batch = engine.runner.prefill_batch
    engine.runner.prefill_batch = lambda group: passes.append(len(group)) or prefill_batch(group)
    events = {index: [] for index in range(len(prompts))}
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.submit(str(index), prompt, params, events[index].append)
    assert engine.step()
    assert all(events[index] for index in range(len(prompts)))
    assert passes == [1, 4, 1]
    while engine.step():
        pass
    texts = ["".join(e.text for e in events[index]) for index in range(len(prompts))]
    assert texts == [text for text, _ in uncached]
    assert [events[index][-1].cached_tokens for index in range(len(prompts))] == [0] + [64] * 5
    assert listener.hits == 5 * 64


def test_a_failed_prefill_pass_fails_its_requests_frees_their_blocks_and_the_engine_goes_on(tiny):
    """A forward pass that raises (here a token id past the model's embeddings, which the
    server refuses before the engine; submitted to the engine directly) fails the requests in
    flight with an error event each, frees every block, and the next requests are served."""
    spec, _ = tiny
    engine = _engine(tiny)
    prompts = _conversations(spec.vocab_size, count=3)
    prompts[1] = [*prompts[1], spec.vocab_size + 5]
    events = {index: [] for index in range(len(prompts))}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.submit(str(index), prompt, params, events[index].append)
    while engine.step():
        pass
    for received in events.values():
        assert received[-1].finish_reason == "error"
        assert "IndexError" in received[-1].error
    assert engine.blocks.usage == 0.0 and engine.num_running == engine.num_waiting == 0
    after = _run(engine, _conversations(spec.vocab_size, count=2), max_tokens=4)
    assert [event.completion_tokens for _, event in after] == [4, 4]
