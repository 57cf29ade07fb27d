"""A loaded model and its processor as one object with text and image entry points.

This is what the index, the app and the evaluators use: `Embedder.encode_texts`
and `Embedder.encode_images` take plain strings and PIL images and return
L2-normalised float32 numpy arrays; `preprocess` / `encode_pixels` split the
image path so that decoding can run on other threads (see koclip.index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import numpy as np

from koclip.processing import Processor


# Values sampled per variable for an index fingerprint: enough that any retraining
# or fine-tuning changes it, few enough to cost milliseconds on koclip-base.
DIGEST_SAMPLES = 64


def weights_digest(module, samples: int | None = None) -> str:
    """sha256 (hex) over a module's variables in path order: each one's path and values.

    samples=None hashes every value (exact; about a second per GB).  samples=n
    hashes each variable's shape and n strided values: it still changes when a
    model is retrained or fine-tuned, at a cost of milliseconds.
    """
    import jax
    from flax import nnx

    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(module)), key=lambda kv: tuple(map(str, kv[0]))):
        value = np.asarray(jax.device_get(var.get_value()))
        h.update("/".join(map(str, path)).encode())
        if samples is not None:
            h.update(repr(value.shape).encode())
            flat = value.reshape(-1)
            value = flat[:: max(1, flat.size // samples)][:samples]
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def model_digest(model) -> str:
    """`weights_digest(model, DIGEST_SAMPLES)`, short.  A model that `koclip.load`
    quantised reports the digest of its float32 weights, taken before quantising
    (`model.load_info.weights`), so an index serves every precision of one model;
    any other model is digested as it is now (it may have been trained in place)."""
    from koclip.quantize import count_replaced

    info = getattr(model, "load_info", None)
    if info is not None and getattr(info, "weights", "") and count_replaced(model):
        return info.weights
    return weights_digest(model, DIGEST_SAMPLES)[:16]


def fingerprint(model, processor: Processor) -> str:
    """Hash of the model config, its weights (`model_digest`) and the image preprocessing:
    equal fingerprints, compatible vectors."""
    spec = processor.image_spec
    spec_d = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else repr(spec)
    blob = json.dumps({"config": model.config.to_hf(), "weights": model_digest(model), "preprocess": spec_d},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Embedder:
    """`name`, `fingerprint`, `dim`; `preprocess`, `encode_pixels`, `encode_images`, `encode_texts`."""

    def __init__(self, model, processor: Processor, name: str | None = None):
        self.model = model
        self.processor = processor
        info = getattr(model, "load_info", None)
        self.name = name or (info.name if info else "koclip")
        self.fingerprint = fingerprint(model, processor)
        self.dim = model.config.projection_dim

    def preprocess(self, images: Sequence) -> np.ndarray:
        from koclip.images import preprocess

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
    from koclip.loading import load

    model, processor = load(name, **load_kw)
    return Embedder(model, processor, name=name)
