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
