"""The KV block pool: allocation, reference counts, prefix hashing and LRU eviction.

Blocks are bookkeeping only (ids into the tensors of models.layers.KVCache). A full block is
named by a hash chain over every token up to its end, so a block is shared only by requests
whose whole history up to it is the same. A block nobody references stays hashed in the free
list until it is reused, least recently freed first: that is the prefix cache.

A request's last, partly filled block is kept too, as a "tail" named by the chain hash of its
few tokens: the next chat turn, whose prompt is the previous prompt + answer + more, takes it
over and writes its own tokens into the rest of it, so the whole computed history is reused, not
all but the last partial block. A tail is never shared: one later request takes it, or nobody."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tail_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None  # a full block's name in the prefix cache
        self.tail_hash: Optional[int] = None  # a free partial block's name (BlockManager.tails)
        self.token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


@dataclass
class CachedPrefix:
    """What the prefix cache holds of a request's tokens: full blocks, then maybe a tail."""

    blocks: list[int] = field(default_factory=list)
    tail: Optional[int] = None
    num_tokens: int = 0

    @property
    def block_ids(self) -> list[int]:
        return self.blocks + ([self.tail] if self.tail is not None else [])


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
        self.tails: dict[int, int] = {}  # tail hash -> block id (free partial blocks)
        # Prefix-cache statistics over admitted prompts.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """The cached blocks matching the start of the request's tokens.

        At least the last token is always left to compute: its logits are needed."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return CachedPrefix()  # prompt logprobs need every prompt position computed
        return self._match(req.token_ids, req.num_tokens - 1)

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of token_ids the prefix cache covers. Read-only: no ref counts,
        no LRU order. Safe to call from another thread: each dict lookup is atomic under the GIL,
        so the worst case is an answer one engine step out of date."""
        if not self.enable_prefix_caching:
            return 0
        return self._match(token_ids, len(token_ids)).num_tokens

    def _match(self, token_ids: Sequence[int], limit: int) -> CachedPrefix:
        """Full blocks by their hash chain, then the longest tail that continues it, covering at
        most `limit` tokens."""
        bs, parent, found = self.block_size, None, CachedPrefix()
        for start in range(0, limit - bs + 1, bs):
            tokens = tuple(token_ids[start:start + bs])
            h = chain_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.blocks.append(block_id)
            parent = h
        start = len(found.blocks) * bs
        for k in range(min(bs - 1, limit - start), 0, -1):
            tokens = tuple(token_ids[start:start + k])
            block_id = self.tails.get(chain_hash(parent, tokens))
            if block_id is not None and self.blocks[block_id].token_ids == tokens:
                found.tail, start = block_id, start + k
                break
        found.num_tokens = start
        return found

    def can_admit(self, req: Request, cached: CachedPrefix, num_new_tokens: int) -> bool:
        held = cached.block_ids
        reusable_free = sum(1 for b in held if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(cached.num_tokens + num_new_tokens) - len(held)
        return needed <= self.num_free_blocks - reusable_free

    def admit(self, req: Request, cached: CachedPrefix) -> None:
        """Give a waiting request its cached prefix (nothing when there is none)."""
        for block_id in cached.blocks:
            self._ref(block_id)
        if cached.tail is not None:  # taken over: this request writes the rest of it
            self._forget_tail(self.blocks[cached.tail])
            self._ref(cached.tail)
        req.block_table = cached.block_ids
        req.num_computed_tokens = cached.num_tokens
        req.block_hashes = [self.blocks[b].hash for b in cached.blocks]
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            self.num_queried_tokens += req.num_prompt_tokens
            self.num_hit_tokens += req.num_cached_tokens

    def _forget_tail(self, block: Block) -> None:
        if block.tail_hash is not None:
            if self.tails.get(block.tail_hash) == block.block_id:
                del self.tails[block.tail_hash]
            block.tail_hash, block.token_ids = None, ()

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
            self._forget_tail(block)
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
        self._keep_tail(req)
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None and block.tail_hash is None:
                    self.free.move_to_end(block_id, last=False)  # empty blocks are reused first
        req.block_table = []
        req.block_hashes = []
        req.num_computed_tokens = 0

    def _keep_tail(self, req: Request) -> None:
        """Name the request's partly filled last computed block, if only it holds the block."""
        bs = self.block_size
        i, k = divmod(req.num_computed_tokens, bs)
        if not self.enable_prefix_caching or k == 0 or len(req.block_hashes) != i:
            return
        block = self.blocks[req.block_table[i]]
        tokens = tuple(req.token_ids[i * bs:i * bs + k])
        h = chain_hash(req.block_hashes[-1] if i else None, tokens)
        if block.ref_count == 1 and block.hash is None and h not in self.tails:
            block.tail_hash, block.token_ids = h, tokens
            self.tails[h] = block.block_id
