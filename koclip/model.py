"""The two-tower model: a text tower and an image tower projected into one space."""

from __future__ import annotations

import weakref
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
# Towers served by another runtime (koclip.onnx_runtime): model -> {tower: fn(*arrays) -> embeddings}.
# Held beside the model, not in it: nnx would make a session part of the model's graph definition.
_SERVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# CLIP clips its learned temperature exp(logit_scale) at 100; zero-shot scores use the same ceiling.
MAX_LOGIT_SCALE = 100.0


class KoCLIP(nnx.Module):
    """A dual encoder.

    `encode_image(pixel_values (n, H, W, 3) float32)` -> (n, projection_dim), L2-normalised.
    `encode_text(input_ids (n, seq) int32, attention_mask (n, seq))` -> (n, projection_dim), L2-normalised.
    `__call__(input_ids, attention_mask, pixel_values)` -> logits_per_image (n_images, n_texts),
    scaled by exp(logit_scale) (plus logit_bias when `config.scoring` is "sigmoid").
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
            self.text_projection = _projection(config.tower_head("text"), config.text.output_dim,
                                               config.projection_dim, rngs)
            self.visual_projection = _projection(config.tower_head("vision"), config.vision.output_dim,
                                                 config.projection_dim, rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))
        # SigLIP's learned bias, which turns a scaled cosine into a pair's own logit.
        self.logit_bias = (nnx.Param(jnp.asarray(config.logit_bias_init, jnp.float32))
                           if config.scoring == "sigmoid" else None)

    def image_features(self, pixel_values):
        """Projected, unnormalised image features (n, projection_dim)."""
        _, pooled = self.vision_model(pixel_values)
        return self.project_image(pooled)

    def project_image(self, pooled):
        """The image head: the vision tower's pooled output (n, vision.output_dim) -> (n, projection_dim),
        unnormalised.  For training on cached tower features (koclip.train)."""
        if self.config.head == "conse":  # the head also reads the CNN's class scores
            return self.visual_projection(pooled, self.vision_model.classify(pooled))
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def text_features(self, input_ids, attention_mask):
        """Projected, unnormalised text features (n, projection_dim)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return pooled if self.text_projection is None else self.text_projection(pooled)

    def encode_image(self, pixel_values):
        """(n, H, W, 3) pixels -> (n, projection_dim) L2-normalised embeddings.

        Called with concrete arrays, runs a compiled function with the batch padded
        to a bucket size; inside a trace (training), runs inline.
        """
        if isinstance(pixel_values, jax.core.Tracer):
            return l2_normalize(self.image_features(pixel_values).astype(jnp.float32))
        served = self.served_by("image")
        if served is not None:
            return served(pixel_values)
        return _bucketed(_encode_image_jit, self, pixel_values)

    def encode_text(self, input_ids, attention_mask):
        """(n, L) token ids and mask -> (n, projection_dim) L2-normalised embeddings."""
        if isinstance(input_ids, jax.core.Tracer):
            return l2_normalize(self.text_features(input_ids, attention_mask).astype(jnp.float32))
        served = self.served_by("text")
        if served is not None:
            return served(input_ids, attention_mask)
        return _bucketed(_encode_text_jit, self, input_ids, attention_mask)

    def serve(self, tower: str, fn=None) -> None:
        """Makes encode_image (`tower` "image") or encode_text ("text") call `fn` instead of the
        compiled JAX program: `fn(pixel_values)` or `fn(input_ids, attention_mask)` -> (n,
        projection_dim) L2-normalised embeddings (koclip.onnx_runtime serves a tower so).  None: back
        to JAX.  Inside a trace (training) and in image_features / text_features JAX always runs."""
        if tower not in ("image", "text"):
            raise ValueError(f"unknown tower {tower!r}; valid: image, text")
        served = _SERVED.setdefault(self, {})
        if fn is None:
            served.pop(tower, None)
        else:
            served[tower] = fn

    def served_by(self, tower: str):
        """What `serve` set for `tower`, or None (the JAX program)."""
        return _SERVED.get(self, {}).get(tower)

    def __call__(self, input_ids, attention_mask, pixel_values):
        """logits_per_image (n_images, n_texts): the model's own logits, exp(logit_scale) * cosine,
        plus logit_bias for sigmoid-scored models (SigLIP)."""
        zimg = self.encode_image(pixel_values)
        ztxt = self.encode_text(input_ids, attention_mask)
        logits = jnp.exp(self.logit_scale[...]) * zimg @ ztxt.T
        return logits if self.logit_bias is None else logits + self.logit_bias[...]

    @property
    def scoring(self) -> str:
        """"softmax" (CLIP-style: label scores compete) or "sigmoid" (SigLIP: each is independent)."""
        return self.config.scoring

    def label_scale(self) -> float:
        """The factor zero-shot scores put on a cosine: exp(logit_scale), for softmax-scored models at
        most MAX_LOGIT_SCALE (CLIP's own ceiling)."""
        scale = float(np.exp(np.asarray(self.logit_scale[...], np.float64)))
        return scale if self.scoring == "sigmoid" else min(scale, MAX_LOGIT_SCALE)

    def label_probabilities(self, zimg, ztxt) -> np.ndarray:
        """Zero-shot scores of each image (rows) for each label (columns), float64 (n, m), from
        L2-normalised zimg (n, d) and ztxt (m, d).

        softmax scoring: a softmax over the labels of label_scale() * cosine (each row sums to 1).
        sigmoid scoring: sigmoid(label_scale() * cosine + logit_bias), each label on its own (a row
        need not sum to 1: none of the labels, or several, may fit).
        The CLI and the app both score labels with this, so they print the same percentages.
        """
        logits = self.label_scale() * (np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T)
        if self.scoring == "sigmoid":
            logits = logits + float(np.asarray(self.logit_bias[...], np.float64))
            return 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, without overflow for large |logits|
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return p / p.sum(axis=-1, keepdims=True)


def _projection(head: str, n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear | None:
    """A tower's projection into the joint space: bias-free ("linear"), with a bias ("affine"),
    or none (the tower's output is already in it)."""
    if head == "none":
        return None
    return nnx.Linear(n_in, n_out, use_bias=head == "affine", kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


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
