"""The KV block pool: allocation, reference counts, prefix hashing and LRU eviction.

Blocks are bookkeeping only (ids into the tensors of models.layers.KVCache). A full block is
named by a hash chain over every token up to its end, so a block is shared only by requests
whose whole history up to it is the same. A block nobody references stays hashed in the free
list until it is reused, least recently freed first: that is the prefix cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from .request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


def chain_hash(parent: Optional[int], token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # Prefix-cache statistics over admitted prompts.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Ids of cached blocks matching the start of the request's tokens.

        At least the last token is always left to compute: its logits are needed."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        found, parent = [], None
        for i in range(max_blocks):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of token_ids full blocks in the prefix cache cover. Read-only:
        no ref counts, no LRU order. Safe to call from another thread: each dict lookup is atomic
        under the GIL, so the worst case is an answer one engine step out of date."""
        if not self.enable_prefix_caching:
            return 0
        bs, parent, n = self.block_size, None, 0
        for start in range(0, len(token_ids) - bs + 1, bs):
            tokens = tuple(token_ids[start:start + bs])
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            n += bs
        return n

    def can_admit(self, req: Request, cached: list[int], num_new_tokens: int) -> bool:
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return needed <= self.num_free_blocks - reusable_free

    def admit(self, req: Request, cached: list[int]) -> None:
        """Give a waiting request its cached prefix blocks (a no-op list when there are none)."""
        for block_id in cached:
            self._ref(block_id)
        req.block_table = list(cached)
        req.num_computed_tokens = len(cached) * self.block_size
        req.block_hashes = [self.blocks[b].hash for b in cached]
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            self.num_queried_tokens += req.num_prompt_tokens
            self.num_hit_tokens += req.num_cached_tokens

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    # -- allocation ---------------------------------------------------------------------------

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Make the block table cover num_new_tokens more tokens; all or nothing."""
        needed = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached content
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            req.block_table.append(block_id)
        return True

    def commit_full_blocks(self, req: Request) -> None:
        """Name the blocks whose every slot now holds computed K/V, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(req.block_hashes[-1] if req.block_hashes else None, tokens)
            req.block_hashes.append(h)
            block = self.blocks[req.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id

    def free_request(self, req: Request) -> None:
        """Return a request's blocks. Later blocks go to the free list first, so a prefix's
        head outlives its tail in the cache."""
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # empty blocks are reused first
                else:
                    self.free[block_id] = None
        req.block_table = []
        req.block_hashes = []
        req.num_computed_tokens = 0
