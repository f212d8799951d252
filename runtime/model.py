"""The Mixtral forward pass the engine runs, over a paged KV cache (see runtime/block_manager.py).

Weights come from a Hugging Face Mixtral folder's safetensors files; the forward pass is ours
because the engine needs two things transformers' modules don't give together:

* **Batch invariance on CPU.** A sequence's logits must not depend on which other sequences share
  the forward pass, so that greedy output under load equals the output of the request alone. MKL
  picks other kernels (other summation orders) for GEMMs of 1-3 rows and vectorised kernels leave
  a scalar tail whose transcendental functions round differently, so in `batch_invariant` mode
  every token batch is padded to a multiple of `ROW_MULTIPLE` rows and attention runs per
  sequence over exactly that sequence's cache, the same call as when it runs alone. Prefill
  attention runs block by block so that a prefix-cache hit gives the same bits as no hit.
* **No host synchronisation in the GPU decode step**: experts run as two grouped GEMMs over
  tokens sorted by expert (offsets stay on the device), and attention gathers each sequence's
  blocks through a slot matrix held on the device, so the step can be queued ahead of the GPU
  and captured in a CUDA graph.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from runtime.block_manager import SCRATCH_BLOCK

# Row counts that the CPU GEMMs (F.linear, grouped_mm) treat alike. Which small row counts get
# other kernels depends on the CPU: on one AVX-512 machine GEMMs of 1, 2, 3, 5 and 7 rows did
# and multiples of 4 agreed; on an AVX-512 + AMX machine every count from 1 to 10 could, 4 and
# 8 included, and every count from 11 up agreed row for row, in any position, with 1 or 2
# threads. Token batches and each expert's group of tokens are padded to 16 rows.
ROW_MULTIPLE = 16
EXPERT_ROW_MULTIPLE = 16


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        if getattr(config, "model_type", None) != "mixtral":
            raise ValueError(f"expected a Mixtral checkpoint, got model_type={config.model_type!r}")
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r}: only 'default' is implemented")
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 1e6))
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            num_experts=config.num_local_experts,
            experts_per_token=config.num_experts_per_tok,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=config.max_position_embeddings,
        )

    @property
    def active_parameters_per_token(self) -> int:
        """Weights one decode step reads for a single sequence (attention + top-k experts)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        experts = self.experts_per_token * 3 * self.hidden_size * self.intermediate_size
        router = self.num_experts * self.hidden_size
        return self.num_layers * (attention + experts + router) + self.vocab_size * self.hidden_size

    @property
    def total_parameters(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        experts = self.num_experts * 3 * self.hidden_size * self.intermediate_size
        router = self.num_experts * self.hidden_size
        return (
            self.num_layers * (attention + experts + router)
            + 2 * self.vocab_size * self.hidden_size
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o_proj: torch.Tensor  # [hidden, heads * head_dim]
    post_attention_norm: torch.Tensor  # [hidden]
    router: torch.Tensor  # [experts, hidden]
    gate_up: torch.Tensor  # [experts, 2 * intermediate, hidden]: gate (w1) rows, then up (w3)
    down: torch.Tensor  # [experts, hidden, intermediate]


@dataclass
class MixtralWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]


# MixtralConfig's defaults for the fields ModelSpec reads, for config.json files that omit them.
_MIXTRAL_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "tie_word_embeddings": False,
}


def read_mixtral_config(folder: Path) -> SimpleNamespace:
    """config.json with MixtralConfig's defaults filled in, without importing transformers."""
    raw = json.loads((folder / "config.json").read_text())
    config = {**_MIXTRAL_DEFAULTS, **raw}
    # transformers 5 keeps RoPE settings in rope_parameters; older files have rope_theta and
    # rope_scaling at the top level.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope.setdefault("rope_theta", raw.get("rope_theta", 1e6))
    config["rope_parameters"] = rope
    return SimpleNamespace(**config)


def load_mixtral(
    folder: Path, *, dtype: torch.dtype, device: torch.device
) -> tuple[ModelSpec, MixtralWeights]:
    """Read a Hugging Face Mixtral folder's safetensors files directly into our layout.

    Going through transformers' model classes cost the runtime's cold start more than the rest
    of it together (importing the modelling code pulls in torch._dynamo, then every module is
    built and initialised before the checkpoint overwrites it). Casting follows
    `from_pretrained(dtype=...)`: each stored tensor is converted with `.to(dtype)`, so the
    weights are the same bits (tests/runtime/test_runtime_model.py checks the logits).
    """
    config = read_mixtral_config(folder)
    spec = ModelSpec.from_hf_config(config)
    tensors = _read_safetensors(folder)

    def take(name: str) -> torch.Tensor:
        try:
            tensor = tensors.pop(name)
        except KeyError:
            raise ValueError(f"{folder}: the checkpoint has no tensor {name!r}") from None
        return tensor.to(device=device, dtype=dtype).contiguous()

    def experts(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers 5 checkpoints hold fused tensors; the original Mixtral layout has
        # w1 (gate), w3 (up) and w2 (down) per expert, fused here as transformers 5 fuses them.
        fused = f"{prefix}.mlp.experts"
        if f"{fused}.gate_up_proj" in tensors:
            return take(f"{fused}.gate_up_proj"), take(f"{fused}.down_proj")
        each = f"{prefix}.block_sparse_moe.experts"
        gate_up = torch.stack(
            [
                torch.cat([take(f"{each}.{e}.w1.weight"), take(f"{each}.{e}.w3.weight")])
                for e in range(spec.num_experts)
            ]
        )
        down = torch.stack([take(f"{each}.{e}.w2.weight") for e in range(spec.num_experts)])
        return gate_up, down

    layers = []
    for index in range(spec.num_layers):
        prefix = f"model.layers.{index}"
        attention = f"{prefix}.self_attn"
        router = (
            f"{prefix}.mlp.gate.weight"
            if f"{prefix}.mlp.gate.weight" in tensors
            else f"{prefix}.block_sparse_moe.gate.weight"
        )
        gate_up, down = experts(prefix)
        layers.append(
            LayerWeights(
                input_norm=take(f"{prefix}.input_layernorm.weight"),
                qkv=torch.cat(
                    [
                        take(f"{attention}.q_proj.weight"),
                        take(f"{attention}.k_proj.weight"),
                        take(f"{attention}.v_proj.weight"),
                    ]
                ),
                o_proj=take(f"{attention}.o_proj.weight"),
                post_attention_norm=take(f"{prefix}.post_attention_layernorm.weight"),
                router=take(router),
                gate_up=gate_up,
                down=down,
            )
        )
    embed = take("model.embed_tokens.weight")
    if "lm_head.weight" in tensors or not config.tie_word_embeddings:
        lm_head = take("lm_head.weight")
    else:
        lm_head = embed
    weights = MixtralWeights(
        embed=embed, layers=layers, final_norm=take("model.norm.weight"), lm_head=lm_head
    )
    return spec, weights


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(path.name for path in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def random_mixtral(
    spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, seed: int = 0, std: float = 0.02
) -> MixtralWeights:
    """Random weights made directly on `device` (for benchmarks of full-size architectures)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        tensor = torch.empty(*shape, dtype=dtype, device=device)
        return tensor.normal_(0.0, std, generator=generator)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=dtype, device=device)

    hidden, inter, experts = spec.hidden_size, spec.intermediate_size, spec.num_experts
    qkv_rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return MixtralWeights(
        embed=normal(spec.vocab_size, hidden),
        layers=[
            LayerWeights(
                input_norm=ones(hidden),
                qkv=normal(qkv_rows, hidden),
                o_proj=normal(hidden, spec.num_heads * spec.head_dim),
                post_attention_norm=ones(hidden),
                router=normal(experts, hidden),
                gate_up=normal(experts, 2 * inter, hidden),
                down=normal(experts, hidden, inter),
            )
            for _ in range(spec.num_layers)
        ],
        final_norm=ones(hidden),
        lm_head=normal(spec.vocab_size, hidden),
    )


class MixtralRunner:
    """Prefill and decode over a paged KV cache of `num_blocks` blocks of `block_size` positions.

    Per layer the cache is [kv_heads, num_blocks * block_size, head_dim]: position p of a
    sequence with block table t lives in slot t[p // block_size] * block_size + p % block_size.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: MixtralWeights,
        *,
        max_num_seqs: int,
        max_model_len: int,
        batch_invariant: bool,
        num_blocks: int | None = None,
        block_size: int = 16,
    ):
        self.spec = spec
        self.weights = weights
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.batch_invariant = batch_invariant
        self.block_size = block_size
        # By default as many positions as one full-length row per sequence (the cache this
        # runner had before it was paged), plus the scratch block.
        self.num_blocks = num_blocks or (-(-max_num_seqs * max_model_len // block_size) + 1)
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        # Zeros, not empty: masked positions are multiplied by a probability of exactly 0, and
        # 0 * NaN from uninitialised memory would be NaN.
        cache_shape = (spec.num_kv_heads, self.num_blocks * block_size, spec.head_dim)
        self.k_cache = [
            torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
            for _ in range(spec.num_layers)
        ]
        self.v_cache = [
            torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
            for _ in range(spec.num_layers)
        ]
        # Same arithmetic as transformers' default RoPE, tabulated once per position.
        inv_freq = 1.0 / (
            spec.rope_theta
            ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
        )
        padded_len = _round_up(max_model_len, block_size)
        freqs = torch.arange(padded_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        self.rope_cos = angles.cos().to(device=self.device, dtype=self.dtype)
        self.rope_sin = angles.sin().to(device=self.device, dtype=self.dtype)
        self.positions = torch.arange(padded_len, device=self.device)
        self._block_offsets = torch.arange(block_size, device=self.device)
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        self._grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = None
        self._batch_buckets: list[int] = []

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _slots(self, block_table: list[int], num_blocks: int) -> torch.Tensor:
        """Cache slots of the first `num_blocks` blocks of a table, position by position."""
        blocks = torch.tensor(block_table[:num_blocks], dtype=torch.long, device=self.device)
        return (blocks[:, None] * self.block_size + self._block_offsets[None, :]).reshape(-1)

    def prefill(self, block_table: list[int], token_ids: list[int], start: int = 0) -> torch.Tensor:
        """One sequence's `prefill_batch`: the float32 logits of its last token."""
        return self.prefill_batch([(block_table, token_ids, start)])[0]

    @torch.inference_mode()
    def prefill_batch(self, sequences: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
        """For each (block table, token ids, start): compute the cache entries of
        `token_ids[start:]` (those before `start` are in the cache already: a prefix-cache hit);
        return the float32 logits of each sequence's last token, [sequences, vocab].

        The sequences' new tokens share one forward pass (one set of GEMMs over all their rows),
        and attention runs per sequence over its own cache. In batch-invariant mode `start` is a
        multiple of `block_size` and attention runs block by block, each block of queries over
        the keys up to its own end: a position's numbers then depend only on the tokens up to
        its block's end, so they are the same bits whether the prefix came from the cache or
        was computed here, whatever follows the prompt and whatever shares the pass (GEMM rows
        are computed alike in any position of a padded batch)."""
        parts = []
        for block_table, token_ids, start in sequences:
            length = len(token_ids)
            if length - start < 1:
                raise ValueError("prefill needs at least one token to compute")
            if self.batch_invariant and start % self.block_size:
                raise ValueError("a cached prefix must be whole blocks in batch-invariant mode")
            slots = self._slots(block_table, -(-length // self.block_size))
            parts.append((slots, start, length))
        tokens = torch.tensor(
            [t for _, token_ids, start in sequences for t in token_ids[start:]],
            dtype=torch.long,
            device=self.device,
        )
        new = tokens.shape[0]
        positions = torch.cat([self.positions[start:length] for _, start, length in parts])
        new_slots = torch.cat([slots[start:length] for slots, start, length in parts])
        hidden = self._pad(F.embedding(tokens, self.weights.embed))
        for index, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(hidden, new, layer, positions)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            # index_copy_/index_select: several times faster than advanced indexing on dim 1.
            k_cache.index_copy_(1, new_slots, k.transpose(0, 1))
            v_cache.index_copy_(1, new_slots, v.transpose(0, 1))
            attention, first = [], 0
            for slots, start, length in parts:
                rows = q[first : first + length - start]
                first += length - start
                keys = k_cache.index_select(1, slots)  # [kv_heads, blocks * size, dim]
                values = v_cache.index_select(1, slots)
                if self.batch_invariant:
                    attention.append(self._blockwise_attention(rows, keys, values, start))
                else:
                    attention.append(
                        self._prefix_attention(rows, keys[:, :length], values[:, :length], start)
                    )
            attention = self._pad(torch.cat(attention) if len(attention) > 1 else attention[0])
            hidden = self._attention_out_and_moe(hidden, attention, new, layer)
        last = torch.tensor(
            list(itertools.accumulate(length - start for _, start, length in parts)),
            device=self.device,
        )
        return self._logits(self._pad(hidden[last - 1]))[: len(parts)]

    def _prefix_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Causal attention of queries at positions start.. over keys 0..: [new, heads * dim]."""
        new = q.shape[0]
        mask = None
        if start:
            mask = self.positions[None, : start + new] <= self.positions[start : start + new, None]
        attention = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None],
            values[None],
            attn_mask=mask,
            is_causal=not start,
            scale=self.scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
        return attention.reshape(new, -1)

    def _blockwise_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Attention one block of queries at a time, each over the keys up to its block's end,
        padded to a whole block (the same call for a block whatever came before or after)."""
        new, size = q.shape[0], self.block_size
        padded = _round_up(new, size)
        if padded != new:
            q = torch.cat([q, q.new_zeros(padded - new, *q.shape[1:])])
        output = q.new_empty(padded, self.spec.num_heads * self.spec.head_dim)
        for first in range(0, padded, size):
            end = start + first + size  # absolute position past this block
            mask = self.positions[None, :end] <= self.positions[start + first : end, None]
            output[first : first + size] = (
                F.scaled_dot_product_attention(
                    q[first : first + size].transpose(0, 1)[None],
                    keys[None, :, :end],
                    values[None, :, :end],
                    attn_mask=mask,
                    scale=self.scale,
                    enable_gqa=True,
                )[0]
                .transpose(0, 1)
                .reshape(size, -1)
            )
        return output[:new]

    @torch.inference_mode()
    def decode(
        self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """One token for each sequence (its position and block table); float32 logits [seqs,
        vocab]. The tables must hold a slot for each sequence's position."""
        batch = len(token_ids)
        if self.batch_invariant:
            tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            position_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
            return self._decode_per_sequence_attention(
                tokens, position_tensor, positions, block_tables
            )
        attend_len = self._attend_len(max(positions) + 1)
        slot_matrix = self._slot_matrix(block_tables, attend_len, batch)
        if self._graphs:
            return self._replay(token_ids, positions, slot_matrix, attend_len)
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        position_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.decode_tensors(tokens, position_tensor, slot_matrix)[:batch]

    def _slot_matrix(
        self, block_tables: list[list[int]], attend_len: int, rows: int
    ) -> torch.Tensor:
        """[rows, attend_len] cache slots; past a table's end (and in spare rows): scratch."""
        blocks = -(-attend_len // self.block_size)
        padded = [
            table[:blocks] + [SCRATCH_BLOCK] * (blocks - len(table)) for table in block_tables
        ]
        padded += [[SCRATCH_BLOCK] * blocks] * (rows - len(block_tables))
        table = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)
        slots = table[:, :, None] * self.block_size + self._block_offsets[None, None, :]
        return slots.reshape(rows, -1)[:, :attend_len]

    def decode_tensors(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot_matrix: torch.Tensor
    ) -> torch.Tensor:
        """Batched decode with no host synchronisation (the step a CUDA graph captures)."""
        spec = self.spec
        batch, attend_len = slot_matrix.shape
        group = spec.num_heads // spec.num_kv_heads
        write_slots = slot_matrix.gather(1, positions[:, None])[:, 0]  # [batch]
        # Cache positions past each row's current token: [batch, 1, 1, attend_len].
        beyond = (self.positions[None, :attend_len] > positions[:, None])[:, None, None, :]
        hidden = F.embedding(tokens, self.weights.embed)
        for index, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(hidden, batch, layer, positions)
            self.k_cache[index][:, write_slots] = k.transpose(0, 1)
            self.v_cache[index][:, write_slots] = v.transpose(0, 1)
            # Grouped-query attention as two batched GEMMs over the gathered blocks: each
            # key/value head is read once for its `group` query heads (no expanded copies).
            queries = q.view(batch, spec.num_kv_heads, group, spec.head_dim)
            keys = self.k_cache[index][:, slot_matrix].transpose(0, 1)  # [batch, kv, len, dim]
            values = self.v_cache[index][:, slot_matrix].transpose(0, 1)
            scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * self.scale
            probs = torch.softmax(scores.masked_fill(beyond, float("-inf")), dim=-1)
            attention = torch.matmul(probs.to(values.dtype), values)
            hidden = self._attention_out_and_moe(hidden, attention.reshape(batch, -1), batch, layer)
        return self._logits(hidden)

    # ---- CUDA graphs: one captured decode step per (batch bucket, attention length) ----

    def capture_cuda_graphs(self) -> int:
        """Capture the decode step for every batch bucket and attention length; return how many.

        Replaying a graph launches the step's ~1,500 kernels at once instead of one Python call
        each. Capture writes scratch keys and values into the scratch block only.
        """
        if self.device.type != "cuda" or self.batch_invariant:
            return 0
        batch_buckets = sorted({min(2**i, self.max_num_seqs) for i in range(16)})
        lengths = sorted({self._attend_len(n) for n in range(1, self.max_model_len + 1, 64)})
        stream = torch.cuda.Stream()
        for bucket in batch_buckets:
            for length in lengths:
                tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
                positions = torch.zeros(bucket, dtype=torch.long, device=self.device)
                slot_matrix = torch.zeros(bucket, length, dtype=torch.long, device=self.device)
                with torch.inference_mode():
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        self.decode_tensors(tokens, positions, slot_matrix)  # warm-up, off-graph
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._graph_pool):
                        logits = self.decode_tensors(tokens, positions, slot_matrix)
                self._graph_pool = graph.pool()
                self._graphs[(bucket, length)] = _DecodeGraph(
                    graph, tokens, positions, slot_matrix, logits
                )
        self._batch_buckets = batch_buckets
        return len(self._graphs)

    def _replay(
        self,
        token_ids: list[int],
        positions: list[int],
        slot_matrix: torch.Tensor,
        attend_len: int,
    ) -> torch.Tensor:
        batch = len(token_ids)
        bucket = next(b for b in self._batch_buckets if b >= batch)
        captured = self._graphs[(bucket, attend_len)]
        padding = [0] * (bucket - batch)  # spare rows write into the scratch block
        captured.tokens.copy_(torch.tensor(token_ids + padding), non_blocking=True)
        captured.positions.copy_(torch.tensor(positions + padding), non_blocking=True)
        captured.slot_matrix.zero_()
        captured.slot_matrix[:batch].copy_(slot_matrix, non_blocking=True)
        captured.graph.replay()
        return captured.logits[:batch]

    def _attend_len(self, needed: int) -> int:
        """Attention length for a step: a power of two from 256, so few shapes cover all steps."""
        length = 256
        while length < needed:
            length *= 2
        return min(length, self.max_model_len)

    def _decode_per_sequence_attention(
        self,
        tokens: torch.Tensor,
        position_tensor: torch.Tensor,
        positions: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        batch = len(positions)
        size = self.block_size
        # Each sequence's slots up to its current position (inclusive): [position + 1].
        slots = [
            self._slots(table, position // size + 1)[: position + 1]
            for table, position in zip(block_tables, positions, strict=True)
        ]
        write_slots = torch.stack([s[-1] for s in slots])
        hidden = self._pad(F.embedding(tokens, self.weights.embed))
        attention = hidden.new_zeros(hidden.shape[0], self.spec.num_heads * self.spec.head_dim)
        for index, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(hidden, batch, layer, position_tensor)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache.index_copy_(1, write_slots, k.transpose(0, 1))
            v_cache.index_copy_(1, write_slots, v.transpose(0, 1))
            for row in range(batch):
                attention[row] = F.scaled_dot_product_attention(
                    q[row, :, None, :][None],
                    k_cache.index_select(1, slots[row])[None],
                    v_cache.index_select(1, slots[row])[None],
                    scale=self.scale,
                    enable_gqa=True,
                ).reshape(-1)
            hidden = self._attention_out_and_moe(hidden, attention, batch, layer)
        return self._logits(hidden)[:batch]

    def _qkv(
        self, hidden: torch.Tensor, rows: int, layer: LayerWeights, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the first `rows` rows of `hidden`, rotated."""
        spec = self.spec
        qkv = self._linear(self._rms_norm(hidden, layer.input_norm), layer.qkv)[:rows]
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        q = qkv[:, :q_size].reshape(-1, spec.num_heads, spec.head_dim)
        k = qkv[:, q_size : q_size + kv_size].reshape(-1, spec.num_kv_heads, spec.head_dim)
        v = qkv[:, q_size + kv_size :].reshape(-1, spec.num_kv_heads, spec.head_dim)
        cos = self.rope_cos[positions][:, None, :]
        sin = self.rope_sin[positions][:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attention_out_and_moe(
        self, hidden: torch.Tensor, attention: torch.Tensor, rows: int, layer: LayerWeights
    ) -> torch.Tensor:
        hidden = hidden + self._linear(attention, layer.o_proj)
        normed = self._rms_norm(hidden, layer.post_attention_norm)
        return hidden + self._moe(normed, rows, layer)

    def _moe(self, hidden: torch.Tensor, rows: int, layer: LayerWeights) -> torch.Tensor:
        """Top-k mixture of experts over the first `rows` rows (padding rows stay zero)."""
        top_k = self.spec.experts_per_token
        router_logits = self._linear(hidden, layer.router)[:rows]
        router_probs = F.softmax(router_logits.float(), dim=-1)
        weights, experts = torch.topk(router_probs, top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(hidden.dtype)
        per_choice = self._experts(hidden, experts, weights, layer)
        # Sum the top-k contributions in rank order, the same order whatever the batch.
        output = per_choice[:, 0]
        for rank in range(1, top_k):
            output = output + per_choice[:, rank]
        if output.shape[0] != hidden.shape[0]:  # padding rows: no expert output
            output = self._pad(output)
        return output

    def _experts(
        self,
        hidden: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        layer: LayerWeights,
    ) -> torch.Tensor:
        """Each token's top-k expert outputs, [tokens, top_k, hidden], as two grouped GEMMs over
        the (token, expert) pairs sorted by expert."""
        top_k, num_experts = self.spec.experts_per_token, self.spec.num_experts
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_experts = flat[order]
        pairs = flat.shape[0]
        if self.batch_invariant:
            # Each expert's group padded to EXPERT_ROW_MULTIPLE rows: its GEMM then computes a
            # token's row the same way whatever else was routed to that expert.
            counts = torch.bincount(flat, minlength=num_experts)
            padded = (counts + EXPERT_ROW_MULTIPLE - 1) // EXPERT_ROW_MULTIPLE * EXPERT_ROW_MULTIPLE
            offsets = torch.cumsum(padded, dim=0)
            rank_in_group = (
                torch.arange(pairs, device=flat.device)
                - (torch.cumsum(counts, dim=0) - counts)[sorted_experts]
            )
            rows = (offsets - padded)[sorted_experts] + rank_in_group
            expert_input = hidden.new_zeros(int(offsets[-1]), hidden.shape[1])
            expert_input[rows] = hidden[order // top_k]
            offsets = offsets.to(torch.int32)
        else:
            # histc rather than bincount: bincount reads its maximum back to the host.
            histogram_input = sorted_experts.int() if hidden.is_cuda else sorted_experts.float()
            counts = torch.histc(histogram_input, bins=num_experts, min=0, max=num_experts - 1)
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            rows = None
            expert_input = hidden[order // top_k]
        gate, up = self._grouped_mm(
            expert_input, layer.gate_up.transpose(-2, -1), offs=offsets
        ).chunk(2, dim=-1)
        expert_output = self._grouped_mm(
            F.silu(gate) * up, layer.down.transpose(-2, -1), offs=offsets
        )
        if rows is not None:
            expert_output = expert_output[rows]
        expert_output = expert_output * weights.reshape(-1)[order, None]
        per_choice = torch.empty_like(expert_output)
        per_choice[order] = expert_output
        return per_choice.view(experts.shape[0], top_k, hidden.shape[1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self._rms_norm(hidden, self.weights.final_norm)
        return self._linear(normed, self.weights.lm_head).float()

    def _rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        as_float = hidden.float()
        variance = as_float.pow(2).mean(-1, keepdim=True)
        normed = as_float * torch.rsqrt(variance + self.spec.rms_norm_eps)
        return weight * normed.to(hidden.dtype)

    def _linear(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # In batch-invariant mode callers pass padded rows, so `_pad` is only a safety net here.
        return F.linear(self._pad(hidden), weight)

    def _pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pad the row count up to a multiple of ROW_MULTIPLE in batch-invariant mode."""
        if not self.batch_invariant:
            return tensor
        rows = tensor.shape[0]
        padded = max(ROW_MULTIPLE, _round_up(rows, ROW_MULTIPLE))
        if padded == rows:
            return tensor
        return torch.cat([tensor, tensor.new_zeros(padded - rows, *tensor.shape[1:])])


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    slot_matrix: torch.Tensor
    logits: torch.Tensor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
