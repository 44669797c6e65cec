"""Bookkeeping of the paged KV cache: blocks, block tables, reference counts, prefix cache.

The KV tensors themselves live in the model runner (``[num_blocks, block_size, kv_heads,
head_dim]`` per layer for K and V). This module only decides which block ids a sequence uses;
it is pure Python and identical on CPU and CUDA.

Prefix caching: a *full* block whose tokens have all been computed is registered under a hash
of its tokens chained with the hash of the block before it (and the LoRA adapter, whose KV
differs). A new sequence looks its full prompt blocks up in that table and shares the hits
(reference counted) instead of recomputing them. Blocks whose reference count drops to zero
keep their contents and their hash and sit in an LRU list; they are reused by another prefix
hit or evicted (least recently freed first) when the free list runs dry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol


class CacheSequence(Protocol):
    """What the block manager needs from a sequence."""

    block_table: list[int]
    block_hashes: list[bytes]
    adapter: str | None
    all_token_ids: list[int]
    block_salts: dict[int, bytes]  # block index -> hash of the images starting there


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...], adapter: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(b"root:" + (adapter or "").encode())
    else:
        h.update(parent)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    _free: list[int] = field(init=False)  # never-used or hash-less free blocks (a stack)
    _evictable: OrderedDict[int, None] = field(init=False)  # free but still cached, LRU first
    _cached: dict[bytes, int] = field(init=False)  # hash -> block id
    num_cache_hits: int = 0  # blocks served from the prefix cache
    num_cache_queries: int = 0  # full prompt blocks looked up

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._evictable = OrderedDict()
        self._cached = {}

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (cached-but-unreferenced ones count as free)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------- prefix cache
    def _chain_hashes(self, seq: CacheSequence, num_full_blocks: int) -> list[bytes]:
        """Hashes of the first ``num_full_blocks`` blocks, extending ``seq.block_hashes``."""
        hashes = seq.block_hashes
        tokens = seq.all_token_ids
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[i - 1] if i else None
            salt = seq.block_salts.get(i)
            if salt is not None:  # an image's placeholders start here: its content is part of the key
                parent = hashlib.blake2b(
                    (parent or b"root:" + (seq.adapter or "").encode()) + b"image:" + salt, digest_size=16
                ).digest()
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs], seq.adapter))
        return hashes[:num_full_blocks]

    def lookup_prefix(self, seq: CacheSequence) -> int:
        """Attach cached blocks for the longest cached prefix of a new sequence.

        Returns the number of tokens whose KV is already there. At least the last token is
        always left to compute (its logits are needed), so at most ``(n - 1) // block_size``
        blocks are reused; a partially filled last block is never shared.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        n = len(seq.all_token_ids)
        max_blocks = (n - 1) // self.block_size
        hits: list[int] = []
        self.num_cache_queries += max_blocks
        for h in self._chain_hashes(seq, max_blocks):
            bid = self._cached.get(h)
            if bid is None:
                break
            hits.append(bid)
        for bid in hits:
            self._take(bid)
        seq.block_table.extend(hits)
        self.num_cache_hits += len(hits)
        return len(hits) * self.block_size

    def cache_full_blocks(self, seq: CacheSequence, num_computed_tokens: int) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._chain_hashes(seq, num_full)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = hashes[i]
            if h in self._cached:  # the same content was computed by another sequence
                continue
            block.hash = h
            self._cached[h] = block.block_id

    # -------------------------------------------------------------- allocation
    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self._evictable.pop(bid, None)
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free:
            bid = self._free.pop()
        else:
            bid, _ = self._evictable.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:
                self._cached.pop(block.hash, None)
                block.hash = None
        self.blocks[bid].ref_count = 1
        return bid

    def allocate(self, seq: CacheSequence, num_tokens: int) -> bool:
        """Make the block table cover ``num_tokens`` tokens; all or nothing."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def free(self, seq: CacheSequence) -> None:
        """Drop the sequence's references; blocks are freed tail first (so the tail is evicted first)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, "block freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table.clear()
