"""The two-tower model: a text tower and an image tower projected into one space."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koclip import towers
from koclip.buckets import BATCH_BUCKETS, bucket
from koclip.compile_cache import model_jit
from koclip.config import ModelConfig
from koclip.towers.conse import ImageHead, TextHead
from koclip.towers.layers import l2_normalize

# How many times each jitted entry point was traced (= compiled): tests count these.
TRACES: Counter = Counter()
# CLIP clips its learned temperature exp(logit_scale) at 100; zero-shot scores use the same ceiling.
MAX_LOGIT_SCALE = 100.0


class KoCLIP(nnx.Module):
    """A dual encoder.

    `encode_image(pixel_values (n, H, W, 3) float32)` -> (n, projection_dim), L2-normalised.
    `encode_text(input_ids (n, seq) int32, attention_mask (n, seq))` -> (n, projection_dim), L2-normalised.
    `__call__(input_ids, attention_mask, pixel_values)` -> logits_per_image (n_images, n_texts),
    scaled by exp(logit_scale).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.text_model = towers.build(config.text, rngs)
        self.vision_model = towers.build(config.vision, rngs)
        if config.head == "conse":
            self.text_projection = TextHead(config.text.output_dim)
            self.visual_projection = ImageHead(config.vision.output_dim, self.vision_model.config.num_classes,
                                               config.text.output_dim, config.conse_top_k)
        else:
            bias = config.head == "affine"
            init = nnx.initializers.normal(0.02)
            self.text_projection = nnx.Linear(config.text.output_dim, config.projection_dim, use_bias=bias,
                                              kernel_init=init, rngs=rngs)
            self.visual_projection = nnx.Linear(config.vision.output_dim, config.projection_dim, use_bias=bias,
                                                kernel_init=init, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

    def image_features(self, pixel_values):
        """Projected, unnormalised image features (n, projection_dim)."""
        _, pooled = self.vision_model(pixel_values)
        return self.project_image(pooled)

    def project_image(self, pooled):
        """The image head: the vision tower's pooled output (n, vision.output_dim) -> (n, projection_dim),
        unnormalised.  For training on cached tower features (koclip.train)."""
        if self.config.head == "conse":  # the head also reads the CNN's class scores
            return self.visual_projection(pooled, self.vision_model.classify(pooled))
        return self.visual_projection(pooled)

    def text_features(self, input_ids, attention_mask):
        """Projected, unnormalised text features (n, projection_dim)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled)

    def encode_image(self, pixel_values):
        """(n, H, W, 3) pixels -> (n, projection_dim) L2-normalised embeddings.

        Called with concrete arrays, runs a compiled function with the batch padded
        to a bucket size; inside a trace (training), runs inline.
        """
        if isinstance(pixel_values, jax.core.Tracer):
            return l2_normalize(self.image_features(pixel_values).astype(jnp.float32))
        return _bucketed(_encode_image_jit, self, pixel_values)

    def encode_text(self, input_ids, attention_mask):
        """(n, L) token ids and mask -> (n, projection_dim) L2-normalised embeddings."""
        if isinstance(input_ids, jax.core.Tracer):
            return l2_normalize(self.text_features(input_ids, attention_mask).astype(jnp.float32))
        return _bucketed(_encode_text_jit, self, input_ids, attention_mask)

    def __call__(self, input_ids, attention_mask, pixel_values):
        zimg = self.encode_image(pixel_values)
        ztxt = self.encode_text(input_ids, attention_mask)
        return jnp.exp(self.logit_scale[...]) * zimg @ ztxt.T

    def label_scale(self) -> float:
        """The factor zero-shot scores put on a cosine: exp(logit_scale), at most MAX_LOGIT_SCALE."""
        return min(float(np.exp(np.asarray(self.logit_scale[...], np.float64))), MAX_LOGIT_SCALE)

    def label_probabilities(self, zimg, ztxt) -> np.ndarray:
        """Zero-shot scores: for each image, a softmax over the labels of label_scale() * cosine.

        zimg (n, d) and ztxt (m, d), L2-normalised -> (n, m) float64, each row summing to 1.
        The CLI and the app both score labels with this, so they print the same percentages.
        """
        logits = self.label_scale() * (np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return p / p.sum(axis=-1, keepdims=True)


def _pad_rows(x, n: int):
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    pad = np.zeros((n - x.shape[0], *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])


def _bucketed(fn, model, *arrays):
    """Runs `fn(model, *arrays)` in chunks whose row counts are bucket sizes."""
    n = np.shape(arrays[0])[0]
    if n == 0:
        return jnp.zeros((0, model.config.projection_dim), jnp.float32)
    top = BATCH_BUCKETS[-1]
    outs = []
    for start in range(0, n, top):
        chunk = [np.asarray(a)[start:start + top] for a in arrays]
        m = chunk[0].shape[0]
        b = bucket(m, BATCH_BUCKETS)
        outs.append(fn(model, *(_pad_rows(c, b) for c in chunk))[:m])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


# model_jit, not nnx.jit: nnx.jit re-walks the module graph on every call (see compile_cache).
@model_jit
def _encode_image_jit(model: KoCLIP, pixel_values):
    TRACES["encode_image"] += 1
    return l2_normalize(model.image_features(pixel_values).astype(jnp.float32))


@model_jit
def _encode_text_jit(model: KoCLIP, input_ids, attention_mask):
    TRACES["encode_text"] += 1
    return l2_normalize(model.text_features(input_ids, attention_mask).astype(jnp.float32))
