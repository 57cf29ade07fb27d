"""Contrastive losses as pure functions over embedding arrays.

All take L2-normalised embeddings `zimg`, `ztxt` of shape (n, d) where row i
of one matches row i of the other, and an optional `valid` (n,) bool mask:
rows that are False (padding, undecodable images) are neither queries nor
negatives, so a padded batch gives the loss of the unpadded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite stand-in for -inf: masked logits must not make NaN gradients.
_MASKED = -1e9


def _valid_or_all(valid, n):
    return jnp.ones((n,), bool) if valid is None else valid.astype(bool)


def clip_loss(zimg, ztxt, scale, valid=None):
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropies.

    zimg, ztxt: (n, d) L2-normalised; scale: scalar multiplier of the cosines
    (exp of the model's logit_scale); valid: optional (n,) bool.
    Returns a scalar: mean over valid rows of (CE_i2t + CE_t2i) / 2.
    """
    n = zimg.shape[0]
    valid = _valid_or_all(valid, n)
    logits = scale * zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T
    both = valid[:, None] & valid[None, :]
    logits = jnp.where(both, logits, _MASKED)
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    per_row = jnp.where(valid, 0.5 * (i2t + t2i), 0.0)
    return per_row.sum() / jnp.maximum(valid.sum(), 1)


def siglip_loss(zimg, ztxt, scale, bias, valid=None):
    """Sigmoid loss (SigLIP): every (image, text) pair is a binary match / no-match decision.

    logits = scale * zimg @ ztxt.T + bias; the loss is
    -sum(log sigmoid(label * logit)) / n_valid with label +1 on the diagonal and
    -1 elsewhere, summed over pairs of valid rows.  Returns a scalar.
    """
    n = zimg.shape[0]
    valid = _valid_or_all(valid, n)
    logits = scale * zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T + bias
    labels = 2.0 * jnp.eye(n) - 1.0
    pair = -jax.nn.log_sigmoid(labels * logits)
    both = valid[:, None] & valid[None, :]
    return jnp.where(both, pair, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def blockwise(loss_fn, zimg, ztxt, *args, blocks: int, valid=None):
    """`loss_fn` computed within `blocks` equal, consecutive row blocks (negatives only from the
    same block), as KoCLIP's original pmap training did per device.

    Returns the block losses averaged with weights = valid rows per block
    (the plain mean of block losses when no row is masked).
    """
    n = zimg.shape[0]
    if n % blocks:
        raise ValueError(f"batch of {n} rows does not split into {blocks} equal blocks")
    valid = _valid_or_all(valid, n)
    zi = zimg.reshape(blocks, n // blocks, -1)
    zt = ztxt.reshape(blocks, n // blocks, -1)
    v = valid.reshape(blocks, n // blocks)
    losses = jax.vmap(lambda a, b, m: loss_fn(a, b, *args, valid=m))(zi, zt, v)
    counts = v.sum(axis=1)
    return (losses * counts).sum() / jnp.maximum(counts.sum(), 1)
