"""A loaded model and its processor as one object with text and image entry points.

This is the library's one wrapper around a model: the index, the patch ranker,
the evaluators and the `koclip classify` command all encode through it.
`Embedder.encode_texts` and `Embedder.encode_images` take plain strings and PIL
images and return L2-normalised float32 numpy arrays; `preprocess` /
`encode_pixels` split the image path so that decoding can run on other threads
(see koclip.index).  Building one costs nothing: the fingerprint is computed
when first read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from koclip.buckets import BATCH_BUCKETS, exact_chunks
from koclip.fingerprint import fingerprint
from koclip.images import preprocess
from koclip.loading import load
from koclip.processing import Processor


class Embedder:
    """`name`, `fingerprint`, `dim`; `preprocess`, `encode_pixels`, `encode_images`, `encode_texts`."""

    def __init__(self, model, processor: Processor, name: str | None = None):
        self.model = model
        self.processor = processor
        info = getattr(model, "load_info", None)
        self.name = name or (info.name if info else "koclip")
        self.dim = model.config.projection_dim
        self.load_spec: dict | None = None  # set by load_embedder

    @functools.cached_property
    def fingerprint(self) -> str:
        """`koclip.fingerprint.fingerprint(model, processor)`, computed on first read and kept:
        it reads every weight variable (about 0.1 s for koclip-mini on a CPU), which only an
        index needs."""
        return fingerprint(self.model, self.processor)

    def preprocess(self, images: Sequence) -> np.ndarray:
        """Images (anything `koclip.images.open_image` takes) -> (n, size, size, 3) float32 pixels."""
        return preprocess(list(images), self.processor.image_spec)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) pixels -> (n, dim) float32, rows L2-normalised.

        Encoded in chunks whose sizes are batch buckets (9 -> 8 + 1): the model would pad
        9 rows to 16 and compute the 7 padding rows too.
        """
        out, start = [], 0
        for size in exact_chunks(len(pixels), BATCH_BUCKETS):
            out.append(np.asarray(self.model.encode_image(pixels[start:start + size]), np.float32))
            start += size
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images (or paths/bytes) -> (n, dim)."""
        return self.encode_pixels(self.processor.preprocess_images(list(images)))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Strings -> (n, dim) float32, rows L2-normalised.

        batch_size texts are tokenized together (padded to the longest of them) and encoded
        at a time.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        texts = list(texts)
        out = []
        for lo in range(0, len(texts), batch_size):
            tok = self.processor.tokenize(texts[lo:lo + batch_size])
            out.append(np.asarray(self.model.encode_text(tok["input_ids"], tok["attention_mask"]), np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def load_embedder(name: str = "koclip-mini", **load_kw) -> Embedder:
    """`koclip.load(name)` wrapped as an Embedder."""
    model, processor = load(name, **load_kw)
    embedder = Embedder(model, processor, name=name)
    # How to load the same model elsewhere (koclip.index.ray_engine's workers).
    embedder.load_spec = {"name": name, **load_kw}
    return embedder
