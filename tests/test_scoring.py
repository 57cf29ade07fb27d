"""Zero-shot scores: one function, owned by the model, used by the CLI and the app alike."""

import math
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from koclip.config import TINY
from koclip.model import MAX_LOGIT_SCALE, KoCLIP


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
    # logit_scale is stored in float32: exp of it is within 2**-24 relative of 2, which moves the
    # probabilities by less than 1e-7; the rest is float64.
    np.testing.assert_allclose(model.label_probabilities(zimg, ztxt), want, rtol=0, atol=1e-6)


def test_the_scale_stops_at_clips_ceiling():
    assert _tiny(math.log(1000.0)).label_scale() == MAX_LOGIT_SCALE == 100.0
    assert _tiny(math.log(24.0)).label_scale() == pytest.approx(24.0, rel=1e-6)


def test_the_cli_and_the_app_print_the_same_percentages(monkeypatch, capsys):
    import koclip
    from koclip.app_support import Engine
    from koclip.cli import main
    from koclip.data import gallery_dir

    model, processor = koclip.load("koclip-mini")
    monkeypatch.setattr(koclip, "load", lambda name, **kw: (model, processor))
    photo = gallery_dir() / "coffee.jpg"
    labels = ["커피", "음료", "컵"]  # close enough that the scale matters: about 91%, 5%, 4%
    assert main(["classify", str(photo), *labels]) == 0
    printed = {label: float(p) for p, label in re.findall(r"^\s*([\d.]+)%\s+(\S+)$", capsys.readouterr().out, re.M)}
    assert set(printed) == set(labels)
    ranked = Engine(model, processor).classify(Image.open(photo), labels)
    assert max(r.score for r in ranked) < 0.99  # not a 100% / 0% split, where any scale would agree
    for r in ranked:  # the CLI prints percentages to two decimals
        assert printed[r.label] == pytest.approx(100 * r.score, abs=0.005 + 1e-9)
