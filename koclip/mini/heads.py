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

The heads themselves (`TextHead`, `ImageHead`, `conse`, `text_embed`,
`image_embed`) live in `koclip.towers.conse`, beside the other towers, since
the model builds them; this module keeps what fits their parameters.
`TextHead` and `ImageHead` put the two side by side, each part unit length
and weighted by `blend` (1 = ridge only, 0 = ConSE only), so a cosine in the
joint space is `blend^2 cos_ridge + (1 - blend)^2 cos_conse` (up to one
constant factor).  KoCLIP then L2-normalises the concatenation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from koclip.towers.conse import ImageHead, TextHead, conse, image_embed, text_embed  # noqa: F401
from koclip.towers.layers import l2_normalize  # noqa: F401


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
