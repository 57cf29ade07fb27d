"""A loaded model and its processor as one object with text and image entry points.

This is what the index, the app and the evaluators use: `Embedder.encode_texts`
and `Embedder.encode_images` take plain strings and PIL images and return
L2-normalised float32 numpy arrays; `preprocess` / `encode_pixels` split the
image path so that decoding can run on other threads (see koclip.index).
Building one costs nothing: the fingerprint is computed when first read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

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

    @functools.cached_property
    def fingerprint(self) -> str:
        """`koclip.fingerprint.fingerprint(model, processor)`, computed on first read and kept:
        it reads every weight variable (about 0.1 s for koclip-mini on a CPU), which only an
        index needs."""
        return fingerprint(self.model, self.processor)

    def preprocess(self, images: Sequence) -> np.ndarray:
        return preprocess(list(images), self.processor.image_spec)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.encode_image(pixels), dtype=np.float32)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images (or paths/bytes) -> (n, dim)."""
        return self.encode_pixels(self.processor.preprocess_images(list(images)))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (n, dim)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batch = self.processor.tokenize(list(texts))
        return np.asarray(self.model.encode_text(batch["input_ids"], batch["attention_mask"]), dtype=np.float32)


def load_embedder(name: str = "koclip-mini", **load_kw) -> Embedder:
    """`koclip.load(name)` wrapped as an Embedder."""
    model, processor = load(name, **load_kw)
    return Embedder(model, processor, name=name)
