"""koclip-mini's heads: a ridge map and ConSE, blended into one joint space.

No image-caption data is used.  The CNN's ImageNet classifier gives one
image-space prototype per class (its weight row), and each class has a
Korean and an English name, so text can be tied to images in two ways:

- ridge: a linear map from the (normalised, centred) e5 text embedding to the
  prototype of the class it names, fitted in closed form.  The image side is
  the pooled CNN feature minus the ImageNet mean feature (`pooled_mean`).
  The map has rank <= 384, so both sides are written in the 384-d basis of
  its singular vectors: nothing an image and a text share is lost.
- ConSE (Norouzi et al. 2014): an image is the probability-weighted mean of
  the text embeddings of the CNN's top-k classes; a text is its own centred
  e5 embedding.  No fitting: it only needs every class's name embedded.

`TextHead` and `ImageHead` put the two side by side, each part unit length
and weighted by `blend` (1 = ridge only, 0 = ConSE only), so a cosine in the
joint space is `blend^2 cos_ridge + (1 - blend)^2 cos_conse` (up to one
constant factor).  KoCLIP then L2-normalises the concatenation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.stats import norm


def l2n(x, eps: float = 1e-12):
    """Rows of `x` scaled to unit length."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def relu6_mean(mu, sigma):
    """E[min(max(X, 0), 6)] for X ~ N(mu, sigma^2), elementwise."""
    def tail(a):  # E[max(X - a, 0)]
        z = (mu - a) / sigma
        return (mu - a) * norm.cdf(z) + sigma * norm.pdf(z)

    return tail(0.0) - tail(6.0)


def pooled_mean(bn_scale, bn_bias):
    """The ImageNet mean of EfficientNet-Lite's pooled feature, from its last BatchNorm.

    Over the training images the head BatchNorm's output has mean `bn_bias`
    and standard deviation |`bn_scale`| per channel (that is what its running
    statistics normalise to); the pooled feature is the spatial mean of
    relu6 of that output, so its mean is E[relu6(N(bias, scale^2))] under a
    Gaussian approximation.  (1280,) -> (1280,).  No images needed.
    """
    return relu6_mean(jnp.asarray(bn_bias), jnp.abs(jnp.asarray(bn_scale)))


def ridge(x, y, lam: float):
    """argmin_M |x M - y|^2 + lam |M|^2 in closed form.  x (n, d), y (n, k) -> M (d, k), float64 inside."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    a = x.T @ x + lam * np.eye(x.shape[1])
    return np.linalg.solve(a, x.T @ y)


def factor(m):
    """Splits a map m (d, k) with d <= k into (text (d, d), image (k, d)) with m = text @ image.T.

    `image` has orthonormal columns (the right singular vectors of m), so a
    text keeps its length and an image loses only what no text can see.
    """
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return u * s, vt.T


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
    t = l2n(pooled) - mean
    return jnp.concatenate([blend * l2n(t @ kernel), (1 - blend) * l2n(t)], axis=-1)


def image_embed(pooled, logits, mean, kernel, class_emb, temperature, blend, k: int):
    """CNN pooled features (n, F) and class logits (n, C) -> joint-space image embeddings (n, 2H).

    mean (F,): ImageNet mean feature; kernel (F, H): the ridge map's image
    basis; class_emb (C, H): each class's centred text embedding (ConSE).
    """
    ridge_part = l2n((pooled - mean) @ kernel)
    conse_part = l2n(conse(logits, class_emb, temperature, k))
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
