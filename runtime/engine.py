"""Continuous (iteration-level) batching over `MixtralRunner`.

Each iteration of `Engine.step`:
1. drops cancelled requests (their cache blocks are free again at once);
2. admits waiting requests while the KV cache has blocks for their prompts, reusing the blocks of
   any cached prefix (`BlockManager`), and computes the rest of their prompts (prefill) in
   groups of up to `prefill_group` sequences, one forward pass per group, each sampling its first
   tokens as soon as its pass is done, so a newcomer never waits for the running ones to finish.
   Groups share the GEMMs of a pass (cheaper per sequence than one pass each) but not its
   per-sequence attention, so one pass for a whole burst would hold every first token back
   until the last newcomer's prefill: on the tiny MoE on CPU groups of 4 gave the lowest median
   time to first token in bench/prefix.py (1 and 32 were slower);
3. gives every running sequence a block for its next position, preempting the newest sequences
   when none is free (they go back to the head of the queue and are recomputed from their tokens,
   mostly from the prefix cache, as vLLM's recompute preemption does), then runs one decode
   forward pass over every running sequence and samples one token each;
4. detokenizes, applies stop conditions and hands each request its new text.

Admission never fails for want of blocks: a request waits until blocks free up, and `submit`
refuses one whose prompt plus max_tokens could never fit in the whole cache.

The engine runs on its own thread (`run_forever`); requests come in and results go out through
thread-safe queues and per-request `sink` callbacks. `transformers`' continuous batching manager
is not used: it would couple the runtime to its paged-attention internals, which differ between
the transformers on our CPU image and the GPU image, and it gives no batch-invariance guarantee.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from runtime.block_manager import BlockManager, block_hashes
from runtime.model import MixtralRunner
from runtime.structured import (
    Constraint,
    MaskPool,
    PendingMasks,
    apply_bitmask,
    closing_reserve,
)

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; else how many most likely alternatives each token reports (0-20).
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution (before
    temperature, top-p and any grammar mask), and the `top` most likely tokens there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationEvent:
    """What a request gets after a step: new text, and the finish reason on the last event."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed
    # The tokens generated since the previous event, with their logprobs (when asked for).
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineListener:
    """Hooks for metrics; the default does nothing."""

    def on_step(self, *, running: int, waiting: int, kv_cache_usage: float) -> None:
        pass

    def on_prompt(self, *, tokens: int) -> None:
        pass

    def on_prefix_cache(self, *, queried_tokens: int, hit_tokens: int) -> None:
        pass

    def on_preemption(self) -> None:
        pass

    def on_generated(self, *, tokens: int) -> None:
        pass

    def on_first_token(self, *, seconds: float) -> None:
        pass

    def on_finished(self, *, reason: str, seconds: float, prompt_tokens: int, tokens: int) -> None:
        pass


@dataclass(eq=False)  # compared by identity
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[GenerationEvent], None]
    arrival: float
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed to the sink
    prefix_offset: int = 0  # incremental detokenization window over output_ids
    read_offset: int = 0
    prefix_text: str = ""  # decode(output_ids[prefix_offset:read_offset])
    first_token_at: float | None = None
    finish_reason: str | None = None
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # of the full blocks in the cache
    cached_tokens: int = 0  # prompt tokens the first admission found in the prefix cache
    admitted: bool = False  # once; a preempted sequence is admitted again to recompute
    error: str | None = None
    # A grammar the output must follow (tools, response_format); None for free text.
    constraint: Constraint | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_emitted: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    def __init__(
        self,
        runner: MixtralRunner,
        decode: Callable[[list[int]], str],
        eos_token_ids: Iterable[int],
        *,
        max_prefill_tokens: int = 2048,
        prefill_group: int = 4,
        enable_prefix_caching: bool = True,
        listener: EngineListener | None = None,
    ):
        """`decode` turns token ids into text (special tokens skipped)."""
        self.runner = runner
        self.decode_tokens = decode
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_seqs = runner.max_num_seqs
        self.max_model_len = runner.max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_group = prefill_group
        self.listener = listener or EngineListener()
        self.blocks = BlockManager(
            runner.num_blocks, runner.block_size, enable_prefix_caching=enable_prefix_caching
        )
        # Blocks filled by decode steps are reusable only where their keys and values are what a
        # prefill of the same tokens computes; on CPU (batch-invariant) decode attention is
        # another kernel, so only prefilled blocks are published there.
        self._publish_decoded_blocks = not runner.batch_invariant
        self._incoming: queue.SimpleQueue[_Sequence] = queue.SimpleQueue()
        self._cancelled: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # in admission order (the newest is preempted)
        self._masks = MaskPool()
        self._unseeded = torch.Generator()
        self._unseeded.seed()  # requests without a seed get non-reproducible samples

    # ---- called from any thread ----

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[GenerationEvent], None],
        constraint: Constraint | None = None,
    ) -> None:
        """Queue a request; with `constraint` every sampled token is one its grammar allows."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is over "
                f"the context length of {self.max_model_len} tokens"
            )
        if self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.usable_blocks:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is over "
                f"the KV cache's {self.blocks.usable_blocks * self.blocks.block_size} tokens"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        self._incoming.put(
            _Sequence(
                request_id=request_id,
                prompt_ids=list(prompt_ids),
                params=params,
                sink=sink,
                arrival=time.monotonic(),
                generator=generator,
                constraint=constraint,
            )
        )
        self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away); its blocks are freed at the next iteration."""
        self._cancelled.put(request_id)
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._incoming.qsize()

    # ---- the engine thread ----

    def run_forever(self) -> None:
        while not self._stopping.is_set():
            if not self.step():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()

    def step(self) -> bool:
        """One iteration; returns False when there was nothing to do."""
        self._take_incoming()
        self._apply_cancellations()
        busy = bool(self._waiting or self._running)
        if busy:
            try:
                self._admit_waiting()
                if self._running:
                    self._decode_running()
            except Exception as error:  # a failed forward pass must not take the server down
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(error)
        self.listener.on_step(
            running=len(self._running),
            waiting=self.num_waiting,
            kv_cache_usage=self.blocks.usage,
        )
        return busy

    def _take_incoming(self) -> None:
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        cancelled = set()
        while True:
            try:
                cancelled.add(self._cancelled.get_nowait())
            except queue.Empty:
                break
        if not cancelled:
            return
        self._waiting = deque(s for s in self._waiting if s.request_id not in cancelled)
        for sequence in list(self._running):
            if sequence.request_id in cancelled:
                sequence.finish_reason = FINISH_ABORT
                self._report_finished(sequence)
                self._release(sequence)

    def _admit_waiting(self) -> None:
        """Admit waiting sequences while blocks and the step's prefill budget allow. Their
        prefills run in groups of up to `prefill_group` sequences, one forward pass each, and
        each group samples its first tokens as soon as its pass is done."""
        budget = self.max_prefill_tokens
        admitted = False
        while self._waiting and len(self._running) < self.max_num_seqs:
            group = self._admit_group(budget, first=not admitted)
            if not group:
                return
            admitted = True
            budget -= sum(len(tokens) - cached for _, tokens, cached in group)
            self._prefill(group)

    def _admit_group(self, budget: int, *, first: bool) -> list[tuple[_Sequence, list[int], int]]:
        group: list[tuple[_Sequence, list[int], int]] = []
        computing: set[bytes] = set()  # keys of the blocks the group's pass computes
        while (
            self._waiting
            and len(group) < self.prefill_group
            and len(self._running) < self.max_num_seqs
        ):
            sequence = self._waiting[0]
            # A preempted sequence is recomputed from all its tokens (the prompt and the output
            # so far); the logits of the last one give its next token, as a decode step would.
            tokens = sequence.prompt_ids + sequence.output_ids
            keys = block_hashes(tokens, self.blocks.block_size)
            # The budget counts the tokens to compute: a prompt mostly in the prefix cache is
            # cheap, so many such newcomers join in one step (as vLLM's scheduler counts them).
            cached_blocks = len(self.blocks.cached_prefix(keys, len(tokens)))
            to_compute = len(tokens) - cached_blocks * self.blocks.block_size
            if (group or not first) and to_compute > budget:
                break
            # A prompt that shares blocks this pass computes waits for the next pass and reads
            # them from the cache then, instead of computing them twice.
            if not computing.isdisjoint(keys[cached_blocks:]):
                break
            allocation = self.blocks.allocate(keys, len(tokens))
            if allocation is None:
                break  # wait until running sequences finish (or are preempted) and free blocks
            self._waiting.popleft()
            sequence.block_table, cached = allocation
            if not sequence.admitted:
                sequence.cached_tokens = cached
                self.listener.on_prefix_cache(queried_tokens=len(tokens), hit_tokens=cached)
                self.listener.on_prompt(tokens=len(tokens))
            sequence.admitted = True
            sequence.block_keys = keys
            self._running.append(sequence)  # before the forward pass, so a failure reaches it
            group.append((sequence, tokens, cached))
            computing.update(keys[cached_blocks:])
            budget -= len(tokens) - cached
        return group

    def _prefill(self, group: list[tuple[_Sequence, list[int], int]]) -> None:
        """One forward pass over the group's uncached tokens; each samples its first token."""
        logits = self.runner.prefill_batch(
            [(sequence.block_table, tokens, cached) for sequence, tokens, cached in group]
        )
        sequences = [sequence for sequence, _, _ in group]
        for sequence in sequences:
            self.blocks.publish(sequence.block_table, sequence.block_keys)
        for sequence, token in zip(sequences, self._sample(logits, sequences), strict=True):
            self._accept(sequence, token)
            if sequence.finish_reason is not None:
                self._release(sequence)

    def _reserve_decode_slots(self) -> None:
        """A cache slot for each running sequence's next position, oldest sequences first;
        when no block is free the newest sequence is preempted (possibly the one asking)."""
        index = 0
        while index < len(self._running):
            sequence = self._running[index]
            while len(sequence.block_table) < self.blocks.blocks_for(sequence.length):
                if self.blocks.append_block(sequence.block_table):
                    continue
                victim = self._running[-1]
                self._preempt(victim)
                if victim is sequence:
                    break
            else:
                index += 1

    def _preempt(self, sequence: _Sequence) -> None:
        self._running = [s for s in self._running if s is not sequence]
        self.blocks.free(sequence.block_table)
        sequence.block_table, sequence.block_keys = [], []
        self._waiting.appendleft(sequence)
        self.listener.on_preemption()

    def _decode_running(self) -> None:
        self._reserve_decode_slots()
        sequences = list(self._running)
        if not sequences:
            return
        # Grammar masks depend only on the tokens so far: computed on another core while the
        # forward pass runs (llguidance releases the GIL), so constraints cost the step little.
        masks = self._masks.start(sequences)
        logits = self.runner.decode(
            [s.output_ids[-1] for s in sequences],
            [s.length - 1 for s in sequences],
            [s.block_table for s in sequences],
        )
        if self._publish_decoded_blocks:
            for sequence in sequences:
                self._publish_full_blocks(sequence)
        tokens = self._sample(logits, sequences, masks)
        for sequence, token in zip(sequences, tokens, strict=True):
            self._accept(sequence, token)
        for sequence in sequences:
            if sequence.finish_reason is not None:
                self._release(sequence)

    def _publish_full_blocks(self, sequence: _Sequence) -> None:
        """Key and publish the blocks the decode step just filled (positions < length)."""
        done = len(sequence.block_keys)
        if sequence.length // self.blocks.block_size <= done:
            return
        tokens = sequence.prompt_ids + sequence.output_ids
        parent = sequence.block_keys[-1] if done else None
        keys = block_hashes(tokens, self.blocks.block_size, start=done, parent=parent)
        sequence.block_keys.extend(keys)
        self.blocks.publish(sequence.block_table, sequence.block_keys, start=done)

    def _release(self, sequence: _Sequence) -> None:
        """Take a finished or cancelled sequence out of the batch and free its blocks."""
        self._running = [s for s in self._running if s is not sequence]
        self.blocks.free(sequence.block_table)
        sequence.block_table = []

    def _sample(
        self, logits: torch.Tensor, sequences: list[_Sequence], masks: PendingMasks | None = None
    ) -> list[int]:
        """Greedy where temperature is 0; else temperature and nucleus (top-p) sampling; a
        constrained sequence chooses among the tokens its grammar allows."""
        raw = logits
        if masks is None:
            masks = self._masks.start(sequences)
        if masks.rows:
            logits = self._mask_disallowed(logits, sequences, masks)
        chosen = logits.argmax(dim=-1).tolist()
        chosen = self._sample_rows(logits, sequences, chosen)
        _record_logprobs(raw, sequences, chosen)
        return chosen

    def _sample_rows(
        self, logits: torch.Tensor, sequences: list[_Sequence], chosen: list[int]
    ) -> list[int]:
        for row, sequence in enumerate(sequences):
            params = sequence.params
            if params.temperature == 0:
                continue
            # Sampled rows go through the CPU so that a seed gives the same text on any device.
            row_logits = logits[row].float().cpu() / params.temperature
            probs = torch.softmax(row_logits, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            generator = sequence.generator or self._unseeded
            chosen[row] = int(torch.multinomial(probs, 1, generator=generator))
        return chosen

    def _mask_disallowed(
        self, logits: torch.Tensor, sequences: list[_Sequence], masks: PendingMasks
    ) -> torch.Tensor:
        rows = masks.rows
        logits = apply_bitmask(logits, masks.wait(), rows)
        for row in rows:
            sequence = sequences[row]
            left = min(
                sequence.params.max_tokens - len(sequence.output_ids),
                self.max_model_len - sequence.length,
            )
            constraint = sequence.constraint
            if constraint.steers_to_close and left <= closing_reserve(sequence.params.max_tokens):
                bonus = constraint.closing_bonus()
                if bonus is not None:
                    logits[row] += bonus.to(logits.device, logits.dtype)
        return logits

    def _accept(self, sequence: _Sequence, token: int) -> None:
        """Add a sampled token to a sequence, decide whether it is finished, emit new text."""
        now = time.monotonic()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self.listener.on_first_token(seconds=now - sequence.arrival)
        sequence.output_ids.append(token)
        self.listener.on_generated(tokens=1)
        params = sequence.params
        constraint = sequence.constraint
        if constraint is not None and not constraint.consume(token):
            sequence.finish_reason = FINISH_ERROR
            sequence.error = f"the output grammar failed: {constraint.error()}"
        elif token in self.eos_token_ids and not params.ignore_eos:
            sequence.finish_reason = FINISH_STOP
        else:
            sequence.text += self._detokenize_next(sequence)
            if constraint is not None and constraint.is_stopped():
                sequence.finish_reason = FINISH_STOP  # the grammar is complete: only EOS follows
            elif (
                len(sequence.output_ids) >= params.max_tokens
                or sequence.length >= self.max_model_len
            ):
                sequence.finish_reason = FINISH_LENGTH
        if sequence.finish_reason is not None:
            sequence.text += self._flush_detokenizer(sequence)
        # A stop sequence wins over the length limit when the last token completes it.
        if params.stop and self._truncate_at_stop(sequence):
            sequence.finish_reason = FINISH_STOP
        if sequence.finish_reason is not None:
            self._emit(sequence, len(sequence.text))
            self._report_finished(sequence)
        else:
            self._emit(sequence, len(sequence.text) - _stop_prefix_holdback(sequence))

    def _detokenize_next(self, sequence: _Sequence) -> str:
        # Decode a small window and hand out only the part past the last complete character, so
        # multi-byte characters split over tokens never surface as U+FFFD halves.
        ids = sequence.output_ids
        text = self.decode_tokens(ids[sequence.prefix_offset :])
        if len(text) > len(sequence.prefix_text) and not text.endswith("\ufffd"):
            new_text = text[len(sequence.prefix_text) :]
            sequence.prefix_offset = sequence.read_offset
            sequence.read_offset = len(ids)
            sequence.prefix_text = self.decode_tokens(ids[sequence.prefix_offset :])
            return new_text
        return ""

    def _flush_detokenizer(self, sequence: _Sequence) -> str:
        ids = sequence.output_ids
        if sequence.read_offset == len(ids):
            return ""
        text = self.decode_tokens(ids[sequence.prefix_offset :])
        sequence.prefix_offset = sequence.read_offset = len(ids)
        return text[len(sequence.prefix_text) :]

    def _truncate_at_stop(self, sequence: _Sequence) -> bool:
        longest = max(len(s) for s in sequence.params.stop)
        start = max(0, sequence.emitted - longest)
        hits = [i for s in sequence.params.stop if (i := sequence.text.find(s, start)) >= 0]
        if not hits:
            return False
        sequence.text = sequence.text[: min(hits)]
        return True

    def _emit(self, sequence: _Sequence, upto: int) -> None:
        finished = sequence.finish_reason is not None
        if upto <= sequence.emitted and not finished:
            return
        text = sequence.text[sequence.emitted : max(upto, sequence.emitted)]
        sequence.emitted = max(upto, sequence.emitted)
        logprobs = tuple(sequence.logprobs[sequence.logprobs_emitted :])
        sequence.logprobs_emitted = len(sequence.logprobs)
        sequence.sink(
            GenerationEvent(
                text=text,
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=len(sequence.output_ids),
                finish_reason=sequence.finish_reason,
                cached_tokens=sequence.cached_tokens,
                error=sequence.error,
                logprobs=logprobs,
            )
        )

    def _report_finished(self, sequence: _Sequence) -> None:
        self.listener.on_finished(
            reason=sequence.finish_reason or FINISH_ABORT,
            seconds=time.monotonic() - sequence.arrival,
            prompt_tokens=len(sequence.prompt_ids),
            tokens=len(sequence.output_ids),
        )

    def _fail_all(self, error: Exception) -> None:
        failed = list(self._running) + list(self._waiting)
        for sequence in self._running:
            self.blocks.free(sequence.block_table)
            sequence.block_table = []
        self._running.clear()
        self._waiting.clear()
        for sequence in failed:
            if sequence.finish_reason is not None:
                continue
            sequence.finish_reason = FINISH_ERROR
            self._report_finished(sequence)
            try:
                sequence.sink(
                    GenerationEvent(
                        text="",
                        prompt_tokens=len(sequence.prompt_ids),
                        completion_tokens=len(sequence.output_ids),
                        finish_reason=FINISH_ERROR,
                        error=f"{type(error).__name__}: {error}",
                    )
                )
            except Exception:
                logger.exception("could not tell request %s about the failure", sequence.request_id)


def _record_logprobs(logits: torch.Tensor, sequences: list[_Sequence], chosen: list[int]) -> None:
    """For the rows that asked: the chosen token's logprob and the top alternatives, from the
    raw logits [rows, vocab] (vLLM's default `raw_logprobs`), so that with temperature 0 the
    top alternative is the chosen token."""
    for row, sequence in enumerate(sequences):
        wanted = sequence.params.logprobs
        if wanted is None:
            continue
        logprobs = torch.log_softmax(logits[row].float(), dim=-1).cpu()
        token = chosen[row]
        top = ()
        if wanted:
            values, ids = torch.topk(logprobs, wanted)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        sequence.logprobs.append(TokenLogprob(token, float(logprobs[token]), top))


def _stop_prefix_holdback(sequence: _Sequence) -> int:
    """Characters at the end of the text that could be the start of a stop sequence."""
    stops = sequence.params.stop
    if not stops:
        return 0
    pending = len(sequence.text) - sequence.emitted
    for size in range(min(pending, max(len(s) for s in stops) - 1), 0, -1):
        tail = sequence.text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0
