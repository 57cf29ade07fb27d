"""Zero-shot scores: one function, owned by the model, used by the CLI and the app alike."""

import math
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from koclip.config import TINY
from koclip.model import MAX_LOGIT_SCALE, KoCLIP
from numerics import U32, unit_norm_atol

U64 = 2.0 ** -53  # float64 unit roundoff


def _tiny(logit_scale: float) -> KoCLIP:
    model = KoCLIP(TINY, rngs=nnx.Rngs(0))
    model.logit_scale[...] = np.float32(logit_scale)
    return model


def test_label_probabilities_are_a_softmax_of_the_scaled_cosines():
    model = _tiny(math.log(2.0))
    zimg = np.array([[1.0, 0.0], [0.6, 0.8]])
    ztxt = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Image 0: cosines (1, 0), scale 2 -> e^2 / (e^2 + 1); image 1: cosines (0.6, 0.8) -> logits (1.2, 1.6).
    want = np.array([[math.e ** 2 / (math.e ** 2 + 1), 1 / (math.e ** 2 + 1)],
                     [1 / (1 + math.exp(0.4)), math.exp(0.4) / (1 + math.exp(0.4))]])
    # logit_scale is stored in float32: log 2 rounded (u of it), so exp of it is within u log 2 relative of
    # 2; a two-way softmax moves by at most 1/4 of its logit difference's change (<= 2 u log 2 * 1); the
    # rest is float64, a few u64.
    atol = 2 * U32 * math.log(2.0) / 4 + 8 * U64
    np.testing.assert_allclose(model.label_probabilities(zimg, ztxt), want, rtol=0, atol=atol)


def test_the_scale_stops_at_clips_ceiling():
    assert _tiny(math.log(1000.0)).label_scale() == MAX_LOGIT_SCALE == 100.0
    # log 24 rounded to float32 (u of it), exp in float64.
    assert _tiny(math.log(24.0)).label_scale() == pytest.approx(24.0, rel=U32 * math.log(24.0) + 2 * U64)


def test_the_cli_and_the_app_print_the_same_percentages(monkeypatch, capsys):
    import koclip
    from koclip_app.support import Engine
    from koclip.cli import main
    from koclip.data import gallery_dir

    model, processor = koclip.load("koclip-mini")
    monkeypatch.setattr(koclip, "load", lambda name, **kw: (model, processor))
    photo = gallery_dir() / "coffee.jpg"
    labels = ["커피", "음료", "컵"]  # close enough that the scale matters: about 91%, 5%, 4%
    assert main(["classify", str(photo), *labels]) == 0
    printed = {label: float(p) for p, label in re.findall(r"^\s*([\d.]+)%\s+(\S+)$", capsys.readouterr().out, re.M)}
    assert set(printed) == set(labels)
    engine = Engine(model, processor)
    ranked = engine.classify(Image.open(photo), labels)
    assert max(r.score for r in ranked) < 0.99  # not a 100% / 0% split, where any scale would agree
    # The same image vector on both sides; the app renormalises the text vectors (label_vectors: a mean
    # over one template), which scales each by 1 +- 2 unit_norm_atol(d) and rounds each entry (u), so a
    # cosine moves by 2 unit_norm_atol(d) |cos| + u, a logit by the scale times that, and a probability p
    # by at most 2 p times the largest logit change.  The CLI prints two decimals (<= 0.005 off).
    cos = float(np.abs(engine.label_vectors(labels, ["이것은 {} 이다"]) @ engine.image(Image.open(photo))).max())
    moved = model.label_scale() * (2 * unit_norm_atol(model.config.projection_dim) * cos + U32)
    for r in ranked:
        assert printed[r.label] == pytest.approx(100 * r.score, abs=0.005 + 100 * 2 * r.score * moved + 1e-9)


def _sigmoid_tiny(logit_scale: float, logit_bias: float) -> KoCLIP:
    model = KoCLIP(TINY.replace(scoring="sigmoid"), rngs=nnx.Rngs(0))
    model.logit_scale[...] = np.float32(logit_scale)
    model.logit_bias[...] = np.float32(logit_bias)
    return model


def test_sigmoid_scores_are_each_labels_own_probability():
    model = _sigmoid_tiny(math.log(4.0), -2.0)
    zimg = np.array([[1.0, 0.0], [0.6, 0.8]])
    ztxt = np.array([[1.0, 0.0], [0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # Logits 4 * cosine - 2: image 0 (2, -2), image 1 (0.4, 1.2); a row does not sum to 1.
    want = np.array([[sig(2.0), sig(-2.0)], [sig(0.4), sig(1.2)]])
    # exp(float32 log 4) is 4 within 4 u log 4 absolute, times a cosine <= 1; -2 is exact in float32;
    # sigmoid's slope is at most 1/4; float64 for the rest.
    atol = 4 * U32 * math.log(4.0) / 4 + 8 * U64
    np.testing.assert_allclose(model.label_probabilities(zimg, ztxt), want, rtol=0, atol=atol)


def test_sigmoid_scale_is_not_capped_at_clips_ceiling():
    # SigLIP's learned scale passes 100 (about 117 in google/siglip-base-patch16-224).
    assert _sigmoid_tiny(math.log(117.0), -12.0).label_scale() > MAX_LOGIT_SCALE


def test_sigmoid_model_logits_add_the_bias():
    model = _sigmoid_tiny(math.log(4.0), -2.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, TINY.text.vocab_size, (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    pixels = rng.normal(size=(2, TINY.vision.image_size, TINY.vision.image_size, 3)).astype(np.float32)
    cos = np.asarray(model.encode_image(pixels)) @ np.asarray(model.encode_text(ids, mask)).T
    # float32: the scale within 4 u log 4 of 4, each cosine within ~d u of its float64 value.
    np.testing.assert_allclose(np.asarray(model(ids, mask, pixels)), 4.0 * cos - 2.0, rtol=0,
                               atol=64 * U32 * 4.0)
