"""Contrastive losses against values worked out by hand on 2x2 and 4x4 examples.

Notation in the comments: CE(row) = log(sum_j exp(logit_j)) - logit_correct.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koclip.train.losses import blockwise, clip_loss, siglip_loss

E = math.e


def test_clip_loss_of_matching_orthogonal_pairs():
    # logits = I (scale 1).  Every row and column: CE = log(e + 1) - 1 = log(1 + 1/e) = 0.3132617.
    z = jnp.eye(2)
    assert float(clip_loss(z, z, 1.0)) == pytest.approx(0.3132617, abs=1e-6)


def test_clip_loss_averages_both_directions():
    # zimg = I, ztxt rows (1, 0) and (0.6, 0.8): logits = [[1, 0.6], [0, 0.8]].
    # image->text rows: log(e^1 + e^0.6) - 1 = 0.5130153,  log(e^0 + e^0.8) - 0.8 = 0.3711007
    # text->image cols: log(e^1 + e^0)   - 1 = 0.3132617,  log(e^0.6 + e^0.8) - 0.8 = 0.5981389
    # mean of the four = 0.4488791
    zimg = jnp.eye(2)
    ztxt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    assert float(clip_loss(zimg, ztxt, 1.0)) == pytest.approx(0.4488791, abs=1e-6)


def test_clip_loss_scale_multiplies_the_cosines():
    # 4x4, logits = 2 I: each CE = log(e^2 + 3) - 2 = log(10.389056) - 2 = 0.3407530.
    z = jnp.eye(4)
    assert float(clip_loss(z, z, 2.0)) == pytest.approx(0.3407530, abs=1e-6)


def test_masked_rows_are_neither_queries_nor_negatives():
    # Rows 2, 3 masked: what is left is the 2x2 identity case, 0.3132617.
    z = jnp.eye(4)
    valid = jnp.array([True, True, False, False])
    assert float(clip_loss(z, z, 1.0, valid)) == pytest.approx(0.3132617, abs=1e-6)


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
    assert float(clip_loss(z, z, 1.0)) == pytest.approx(1.0064089, abs=1e-6)
    assert float(blockwise(clip_loss, z, z, 1.0, blocks=2)) == pytest.approx(0.3132617, abs=1e-6)


def test_siglip_loss_sums_pairs_and_divides_by_batch():
    # logits = I, bias 0: positives -log sigmoid(1) = log(1 + 1/e) = 0.3132617 (x2),
    # negatives -log sigmoid(-0) = log 2 = 0.6931472 (x2); (2*0.3132617 + 2*0.6931472) / 2 = 1.0064089.
    z = jnp.eye(2)
    assert float(siglip_loss(z, z, 1.0, 0.0)) == pytest.approx(1.0064089, abs=1e-6)


def test_siglip_bias_shifts_every_logit():
    # scale 2, bias -1: diagonal logits 1, off-diagonal -1.  Positives -log sigmoid(1),
    # negatives -log sigmoid(+1): four times log(1 + 1/e) = 0.3132617, divided by 2 -> 0.6265234.
    z = jnp.eye(2)
    assert float(siglip_loss(z, z, 2.0, -1.0)) == pytest.approx(0.6265234, abs=1e-6)


def test_blockwise_needs_equal_blocks():
    z = jnp.eye(3)
    with pytest.raises(ValueError, match="3 rows"):
        blockwise(clip_loss, z, z, 1.0, blocks=2)
