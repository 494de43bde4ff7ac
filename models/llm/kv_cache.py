"""The KV cache: a preallocated arena per layer (two halves, front and back) carved into
contiguous batch views, and the block accounting that decides who may join the batch.

ONNX decoders read the cache as one dense `[batch, kv_heads, length, head_dim]` tensor, so
every row of a batch is padded to the batch's row length: the budget counts blocks of that
padded length per row, which is exactly the memory the views use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class BlockBudget:
    """Blocks of `block_size` tokens; a batch of `rows` rows each padded to `row_tokens`
    holds `rows * ceil(row_tokens / block_size)` of them."""

    def __init__(self, total_blocks: int, block_size: int) -> None:
        if total_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.reserved: dict[int, int] = {}  # request key -> tokens reserved

    def blocks_for(self, rows: int, row_tokens: int) -> int:
        return rows * math.ceil(row_tokens / self.block_size)

    @property
    def row_tokens(self) -> int:
        """The padded row length of the current batch, rounded up to whole blocks."""
        longest = max(self.reserved.values(), default=0)
        return math.ceil(longest / self.block_size) * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.blocks_for(len(self.reserved), self.row_tokens)

    def fits_alone(self, tokens: int) -> bool:
        return self.blocks_for(1, tokens) <= self.total_blocks

    def can_reserve(self, tokens: int) -> bool:
        longest = max([tokens, *self.reserved.values()])
        return self.blocks_for(len(self.reserved) + 1, longest) <= self.total_blocks

    def reserve(self, key: int, tokens: int) -> bool:
        if key in self.reserved or not self.can_reserve(tokens):
            return False
        self.reserved[key] = tokens
        return True

    def release(self, key: int) -> None:
        self.reserved.pop(key, None)


class KVArena:
    """Two preallocated buffers per key/value tensor of each layer, each holding
    `capacity_tokens` tokens; `view` reshapes a prefix into a batch tensor without copying."""

    def __init__(self, shape: CacheShape, capacity_tokens: int) -> None:
        self.shape = shape
        self.capacity_tokens = capacity_tokens
        per = capacity_tokens * shape.kv_heads * shape.head_dim
        self._halves = [
            [np.zeros(per, dtype=shape.dtype) for _ in range(2 * shape.layers)] for _ in range(2)
        ]
        self.front = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for half in self._halves for a in half)

    def view(self, half: int, tensor: int, rows: int, length: int) -> np.ndarray:
        """Tensor `tensor` (2 * layer + 0 for keys, + 1 for values) as [rows, kvh, length, hd]."""
        if rows * length > self.capacity_tokens:
            raise MemoryError(
                f"batch {rows}x{length} tokens exceeds the {self.capacity_tokens}-token cache"
            )
        s = self.shape
        n = rows * s.kv_heads * length * s.head_dim
        return self._halves[half][tensor][:n].reshape(rows, s.kv_heads, length, s.head_dim)

    def swap(self) -> None:
        self.front ^= 1

    @property
    def back(self) -> int:
        return self.front ^ 1
