"""Embedding a whole dataset through a koclip.Embedder: images decoded by a thread pool while the
model encodes."""

from __future__ import annotations

import logging
from contextlib import closing

import numpy as np
from tqdm import tqdm

from koclip.embedder import Embedder
from koclip.errors import KoclipError
from koclip.prefetch import prefetched

log = logging.getLogger(__name__)


def _decode_chunk(dataset, indices, embedder: Embedder):
    size = embedder.processor.image_spec.size
    px = np.zeros((len(indices), size, size, 3), np.float32)
    ok = np.zeros(len(indices), bool)
    for r, i in enumerate(indices):
        try:
            px[r] = embedder.preprocess([dataset.image(int(i))])[0]
            ok[r] = True
        except (KoclipError, OSError, ValueError) as e:
            log.warning("skipping image %d: %s", i, e)
    return px, ok


def encode_images(model, processor, dataset, *, batch_size: int = 32, num_workers: int = 2,
                  progress: bool = False, desc: str = "images") -> tuple[np.ndarray, np.ndarray]:
    """(n, projection_dim) L2-normalised float32 image embeddings, and (n,) bool: False where
    undecodable (that row is zeros).  batch_size images are decoded per chunk, num_workers chunks
    at a time on threads while the model encodes."""
    embedder = Embedder(model, processor)
    chunks = [np.arange(lo, min(lo + batch_size, len(dataset))) for lo in range(0, len(dataset), batch_size)]
    z = np.zeros((len(dataset), embedder.dim), np.float32)
    ok = np.zeros(len(dataset), bool)
    decode = lambda idx: (idx, *_decode_chunk(dataset, idx, embedder))  # noqa: E731
    bar = tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False)
    with closing(prefetched(decode, chunks, workers=num_workers, ahead=num_workers + 1)) as decoded:
        for idx, px, good in decoded:
            if good.any():
                z[idx[good]] = embedder.encode_pixels(px[good])
            ok[idx] = good
            bar.update(len(idx))
    bar.close()
    return z, ok


def encode_texts(model, processor, texts, *, batch_size: int = 256) -> np.ndarray:
    """(len(texts), projection_dim) L2-normalised float32 text embeddings (Embedder.encode_texts)."""
    return Embedder(model, processor).encode_texts(texts, batch_size=batch_size)


def subset(dataset, limit: int, seed: int = 0):
    """A deterministic random subset of `limit` examples (the whole dataset when limit is 0 or larger)."""
    if not limit or limit >= len(dataset):
        return dataset
    pick = np.sort(np.random.default_rng([seed, 7]).permutation(len(dataset))[:limit])
    return dataset.take(pick)
