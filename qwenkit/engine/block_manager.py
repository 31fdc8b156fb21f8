"""The paged KV cache's block pool, with prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence holds a
`block_table` of block ids. A block that is full of computed tokens gets a hash chained
from the hash of the block before it, so one hash names a whole prefix; a new sequence
whose prompt starts with the same tokens reuses those blocks (the tokens are compared
on every hit, so a hash collision can never serve the wrong cache). Freed blocks keep
their hash and stay reusable as cache until they are handed out again, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from qwenkit.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(prefix_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prefix_hash, token_ids))


def block_key(seq: Sequence, index: int, block_size: int) -> tuple[int, ...]:
    """What block `index` of `seq` holds: its tokens, then the content hashes of the images whose
    tokens are among them (image placeholders are the same id whatever the image)."""
    start, end = index * block_size, (index + 1) * block_size
    tokens = tuple(seq.token_ids[start:end])
    if seq.multimodal is None:
        return tokens
    return tokens + seq.multimodal.keys_in(start, end)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot (got {num_blocks} x {block_size})")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order they were freed: the front is reused first (least recently used).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Attach the cached blocks that hold a prefix of a new sequence's tokens.

        At least one token is always left to compute, so the step has logits to sample."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        bs = self.block_size
        num_full = (len(seq.token_ids) - 1) // bs
        prefix_hash = None
        for i in range(num_full):
            tokens = block_key(seq, i, bs)
            prefix_hash = chain_hash(prefix_hash, tokens)
            block_id = self.cached.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(prefix_hash)
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_cached_tokens = seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` tokens; False (and no change) if too few are free."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that have become full of computed tokens as prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            tokens = block_key(seq, i, bs)
            prefix_hash = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(prefix_hash)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = prefix_hash, tokens
                self.cached.setdefault(prefix_hash, block.block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks of `seq` past those that hold its first `num_tokens` tokens (the
        slots of speculative tokens that were not kept)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > max(keep, len(seq.block_hashes)):
            self._release(seq.block_table.pop())

    def free_sequence(self, seq: Sequence) -> None:
        """Release every block `seq` holds (its computed state is forgotten)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _release(self, block_id: int) -> None:
        """One holder fewer; a block no one holds goes to the back of the free list (its
        cached prefix, if any, stays reusable until the block is handed out again)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
