"""The ConSE head pair of koclip-mini (config head "conse"): the projections that put e5 text and
EfficientNet image features into one joint space.  How their parameters are fitted, and why, is in
koclip.mini.heads.

`TextHead` and `ImageHead` put a ridge part and a ConSE part side by side, each unit length and
weighted by `blend` (1 = ridge only, 0 = ConSE only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from koclip.towers.layers import l2_normalize


def conse(logits, class_emb, temperature, k: int):
    """ConSE image embeddings.  logits (n, C), class_emb (C, d) -> (n, d), unnormalised.

    The softmax over all C classes is kept only for the k most probable
    classes (the rest are zero), as in ConSE.
    """
    p = jax.nn.softmax(logits / temperature, axis=-1)
    top, idx = jax.lax.top_k(p, k)
    return jnp.einsum("nk,nkd->nd", top, class_emb[idx])


def text_embed(pooled, mean, kernel, blend):
    """pooled e5 outputs (n, H) -> joint-space text embeddings (n, 2H), not yet unit length.

    mean (H,): the mean normalised training text; kernel (H, H): the ridge map
    in its singular basis; blend: weight of the ridge part.
    """
    # e5 embeddings all lie in a narrow cone (cosines ~0.8 between unrelated
    # words): without centring, the shared direction swamps what differs.
    t = l2_normalize(pooled) - mean
    return jnp.concatenate([blend * l2_normalize(t @ kernel), (1 - blend) * l2_normalize(t)], axis=-1)


def image_embed(pooled, logits, mean, kernel, class_emb, temperature, blend, k: int):
    """CNN pooled features (n, F) and class logits (n, C) -> joint-space image embeddings (n, 2H).

    mean (F,): ImageNet mean feature; kernel (F, H): the ridge map's image
    basis; class_emb (C, H): each class's centred text embedding (ConSE).
    """
    ridge_part = l2_normalize((pooled - mean) @ kernel)
    conse_part = l2_normalize(conse(logits, class_emb, temperature, k))
    return jnp.concatenate([blend * ridge_part, (1 - blend) * conse_part], axis=-1)


class TextHead(nnx.Module):
    """KoCLIP's text_projection for head "conse": `text_embed` with its parameters."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None):
        self.mean = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.kernel = nnx.Param(jnp.eye(dim, dtype=jnp.float32))
        self.blend = nnx.Param(jnp.asarray(0.5, jnp.float32))

    def __call__(self, pooled):
        return text_embed(pooled, self.mean[...], self.kernel[...], self.blend[...])


class ImageHead(nnx.Module):
    """KoCLIP's visual_projection for head "conse": `image_embed` with its parameters."""

    def __init__(self, features: int, classes: int, dim: int, top_k: int, *, rngs: nnx.Rngs | None = None):
        self.top_k = top_k
        self.mean = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.kernel = nnx.Param(jnp.zeros((features, dim), jnp.float32))
        self.class_embeddings = nnx.Param(jnp.zeros((classes, dim), jnp.float32))
        self.temperature = nnx.Param(jnp.asarray(1.0, jnp.float32))
        self.blend = nnx.Param(jnp.asarray(0.5, jnp.float32))

    def __call__(self, pooled, logits):
        return image_embed(pooled, logits, self.mean[...], self.kernel[...], self.class_embeddings[...],
                           self.temperature[...], self.blend[...], self.top_k)
