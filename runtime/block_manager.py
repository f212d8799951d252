"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, and automatic prefix caching.

The runner's cache is `num_blocks` blocks of `block_size` token positions; a sequence holds a
block table (the blocks of its positions, in order), so memory follows the tokens a sequence
actually has rather than `max_model_len` per sequence.

Prefix caching follows vLLM's automatic prefix caching
(https://docs.vllm.ai/en/stable/design/prefix_caching.html): a *full* block is keyed by a hash of
its tokens chained with the hash of the block before it, so a key names the whole prefix up to the
block's end. A new sequence reuses the blocks whose keys it shares (reference counts > 1 while
several sequences read them). A block nobody holds goes back to the free list but keeps its key
until it is handed out again; the free list is in least-recently-freed order, so eviction is LRU,
and a sequence frees its blocks tail first so that its deepest blocks are evicted before the
shared head.

Block 0 is never handed out: it is the scratch block that padded rows of a captured CUDA graph
write into.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

SCRATCH_BLOCK = 0


def block_hashes(token_ids: list[int], block_size: int, *, start: int = 0, parent=None):
    """The chained keys of the full blocks of `token_ids` from block `start` on (`parent`: the
    key of block `start - 1`)."""
    keys = []
    for first in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(digest_size=16)
        if parent is not None:
            digest.update(parent)
        digest.update(array("q", token_ids[first : first + block_size]).tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (block 0 is scratch)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # key -> block holding it
        # Blocks nobody holds, least recently freed first (dict order; O(1) removal on a hit).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by sequences (cached but unheld blocks count as free)."""
        return 1.0 - len(self._free) / self.usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, keys: list[bytes], num_tokens: int) -> list[int]:
        """The cached blocks a sequence of `num_tokens` tokens with these block keys can reuse.

        At least the last token is always computed (its logits are needed), so a prompt made only
        of cached full blocks reuses all but its last block."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys[: (num_tokens - 1) // self.block_size]:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, keys: list[bytes], num_tokens: int) -> tuple[list[int], int] | None:
        """A block table for a sequence's first `num_tokens` tokens, reusing cached blocks;
        returns (table, cached tokens), or None when too few blocks are free (nothing changes)."""
        hits = self.cached_prefix(keys, num_tokens)
        fresh = self.blocks_for(num_tokens) - len(hits)
        # A hit on an unheld block takes it off the free list, so it is not free for `fresh`.
        unheld_hits = sum(1 for block in hits if self._ref_counts[block] == 0)
        if fresh > len(self._free) - unheld_hits:
            return None
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        table = hits + [self._take_free() for _ in range(fresh)]
        return table, len(hits) * self.block_size

    def append_block(self, table: list[int]) -> bool:
        """Grow a table by one block; False when none is free."""
        if not self._free:
            return False
        table.append(self._take_free())
        return True

    def free(self, table: list[int]) -> None:
        for block in reversed(table):  # tail first: evicted before the shared head
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def publish(self, table: list[int], keys: list[bytes], start: int = 0) -> None:
        """Make full blocks `start..len(keys)-1` of a table reusable under their keys."""
        if not self.enable_prefix_caching:
            return
        for index in range(start, len(keys)):
            key, block = keys[index], table[index]
            if key in self._cached or self._key_of[block] is not None:
                continue  # the same prefix computed twice at once: the first copy serves
            self._cached[key] = block
            self._key_of[block] = key

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)  # the least recently freed: LRU eviction
        key = self._key_of[block]
        if key is not None:
            del self._cached[key]
            self._key_of[block] = None
        self._ref_counts[block] = 1
        return block
