"""Fixed input sizes.  Every new input shape costs a JIT compile, so batches are
padded to a few row counts and token sequences to a few lengths."""

from __future__ import annotations

from collections.abc import Sequence

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
LENGTH_BUCKETS = (8, 16, 32, 64, 96, 128, 256, 512)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def exact_chunks(n: int, buckets: Sequence[int]) -> list[int]:
    """Chunk sizes that sum to n, each a bucket: the largest that fits, then the rest
    (9 -> [8, 1], 70 -> [32, 32, 4, 2] with BATCH_BUCKETS), so no chunk needs padding rows.
    A remainder below the smallest bucket is one chunk of its own size."""
    sizes = []
    while n > 0:
        size = max((b for b in buckets if b <= n), default=n)
        sizes.append(size)
        n -= size
    return sizes
