"""Contrastive losses against values worked out by hand on 2x2 and 4x4 examples.

Notation in the comments: CE(row) = log(sum_j exp(logit_j)) - logit_correct.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koclip.train.losses import blockwise, clip_loss, siglip_loss
from numerics import U32, reduction_rtol

E = math.e

# Bounds for a float32 loss against a constant worked out by hand (tests/numerics.py): first order
# in u = U32, relative to the magnitudes involved, plus the constant's rounding to 7 decimals.
PRINTED = 5e-8
EXP_LOG = 4 * U32  # XLA's CPU exp, log and log1p are within a few ulp: 4 each is allowed


def clip_atol(n: int, d: int, scale: float) -> float:
    """clip_loss of n unit rows of d entries.  Each logit, (scale * z) @ z.T, is off by (d + 1) u scale;
    logsumexp minus the diagonal is 1-Lipschitz in the logits, so twice that; logsumexp adds 2 u scale
    (the shift by its max), gamma_n (the sum of exps), exp and log, and u per addition of a value up to
    scale + log n; the mean over rows adds gamma_(n+1) of the loss, which is at most 2 scale + log n."""
    m = math.log(n)
    row = 2 * (d + 1) * U32 * scale + 2 * U32 * scale + reduction_rtol(n) + 2 * EXP_LOG + 3 * U32 * (scale + m)
    return row + reduction_rtol(n + 1) * (2 * scale + m) + PRINTED


def siglip_atol(n: int, d: int, scale: float, bias: float) -> float:
    """siglip_loss of n unit rows of d entries.  Each logit is off by (d + 1) u scale and u (scale + |bias|)
    for adding the bias; -log sigmoid is 1-Lipschitz and adds its own exp and log1p and 2 u of its value
    (<= scale + |bias| + log 2); the n * n pairs summed and divided by n give n times a pair's error,
    plus gamma_(n*n + 1) of the loss."""
    logit = (d + 1) * U32 * scale + U32 * (scale + abs(bias))
    pair = logit + 2 * EXP_LOG + 2 * U32 * (scale + abs(bias) + math.log(2))
    return n * pair + reduction_rtol(n * n + 1) * n * (scale + abs(bias) + math.log(2)) + PRINTED


def test_clip_loss_of_matching_orthogonal_pairs():
    # logits = I (scale 1).  Every row and column: CE = log(e + 1) - 1 = log(1 + 1/e) = 0.3132617.
    z = jnp.eye(2)
    assert float(clip_loss(z, z, 1.0)) == pytest.approx(0.3132617, abs=clip_atol(2, 2, 1.0))


def test_clip_loss_averages_both_directions():
    # zimg = I, ztxt rows (1, 0) and (0.6, 0.8): logits = [[1, 0.6], [0, 0.8]].
    # image->text rows: log(e^1 + e^0.6) - 1 = 0.5130153,  log(e^0 + e^0.8) - 0.8 = 0.3711007
    # text->image cols: log(e^1 + e^0)   - 1 = 0.3132617,  log(e^0.6 + e^0.8) - 0.8 = 0.5981389
    # mean of the four = 0.4488791
    zimg = jnp.eye(2)
    ztxt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    assert float(clip_loss(zimg, ztxt, 1.0)) == pytest.approx(0.4488791, abs=clip_atol(2, 2, 1.0))


def test_clip_loss_scale_multiplies_the_cosines():
    # 4x4, logits = 2 I: each CE = log(e^2 + 3) - 2 = log(10.389056) - 2 = 0.3407530.
    z = jnp.eye(4)
    assert float(clip_loss(z, z, 2.0)) == pytest.approx(0.3407530, abs=clip_atol(4, 4, 2.0))


def test_masked_rows_are_neither_queries_nor_negatives():
    # Rows 2, 3 masked: what is left is the 2x2 identity case, 0.3132617.
    z = jnp.eye(4)
    valid = jnp.array([True, True, False, False])
    assert float(clip_loss(z, z, 1.0, valid)) == pytest.approx(0.3132617, abs=clip_atol(4, 4, 1.0))


def test_masked_rows_get_zero_gradient():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 3)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    valid = jnp.array([True, True, True, False])
    g = jax.grad(lambda a: clip_loss(a, jnp.asarray(z), 3.0, valid))(jnp.asarray(z))
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g)[3], 0.0)


def test_local_negatives_only_compete_within_each_block():
    # Rows 0 and 2 are the same vector (1, 0); rows 1 and 3 are (0, 1).
    # Global: each row's logits are (1, 0, 1, 0) up to order, CE = log(2e + 2) - 1 = 1.0064089.
    # Two blocks of two: each block is the 2x2 identity, CE = log(e + 1) - 1 = 0.3132617.
    z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(clip_loss(z, z, 1.0)) == pytest.approx(1.0064089, abs=clip_atol(4, 2, 1.0))
    # The two blocks' losses averaged by their rows: gamma_3 of the loss (<= 2 scale + log 2) more.
    block_atol = clip_atol(2, 2, 1.0) + reduction_rtol(3) * (2 + math.log(2))
    assert float(blockwise(clip_loss, z, z, 1.0, blocks=2)) == pytest.approx(0.3132617, abs=block_atol)


def test_siglip_loss_sums_pairs_and_divides_by_batch():
    # logits = I, bias 0: positives -log sigmoid(1) = log(1 + 1/e) = 0.3132617 (x2),
    # negatives -log sigmoid(-0) = log 2 = 0.6931472 (x2); (2*0.3132617 + 2*0.6931472) / 2 = 1.0064089.
    z = jnp.eye(2)
    assert float(siglip_loss(z, z, 1.0, 0.0)) == pytest.approx(1.0064089, abs=siglip_atol(2, 2, 1.0, 0.0))


def test_siglip_bias_shifts_every_logit():
    # scale 2, bias -1: diagonal logits 1, off-diagonal -1.  Positives -log sigmoid(1),
    # negatives -log sigmoid(+1): four times log(1 + 1/e) = 0.3132617, divided by 2 -> 0.6265234.
    z = jnp.eye(2)
    assert float(siglip_loss(z, z, 2.0, -1.0)) == pytest.approx(0.6265234, abs=siglip_atol(2, 2, 2.0, -1.0))


def test_blockwise_needs_equal_blocks():
    z = jnp.eye(3)
    with pytest.raises(ValueError, match="3 rows"):
        blockwise(clip_loss, z, z, 1.0, blocks=2)
