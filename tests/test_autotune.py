"""koclip.autotune: precision="auto" chosen per tower by measurement, remembered per machine.

Timings are injected (`timer`), so what is tested is the choice, the quality gates and the
cache, never the speed of this machine.  The quality gates run for real on the tiny parity
checkpoint (random weights: only the cosine gate means much there; agreement over clear
top-1 margins is tested on koclip-mini in tests/test_quantize.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import koclip
from koclip import autotune
from koclip.errors import ConfigError
from koclip.quantize import Bf16Linear, Int8Linear, quantize

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity" / "dual_clip_safetensors"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV, raising=False)


@pytest.fixture(scope="module")
def loaded():
    model, _ = koclip.load(str(PARITY))
    return model


@pytest.fixture
def model(loaded):
    """A fresh float32 copy (shared arrays) that a test may quantise."""
    return quantize(loaded, "fp32")


def timer_from(ms: dict):
    """A timer where mode m takes ms[m] milliseconds per call at any batch, on either tower (modes it does
    not name, e.g. the ONNX Runtime ones: twice fp32's); records calls."""

    def timer(tower, mode, batch):
        timer.calls.append((tower, mode, batch))
        return ms.get(mode, 2 * ms["fp32"]) / 1e3

    timer.calls = []
    return timer


def replaced(module) -> set[type]:
    from flax import nnx

    return {type(m) for _, m in nnx.iter_modules(module) if isinstance(m, (Int8Linear, Bf16Linear))}


# ---------------------------------------------------------------- choosing

def test_the_fastest_mode_that_keeps_the_gates_is_chosen_for_each_tower(model):
    plan = autotune.measure(model, timer=timer_from({"fp32": 10, "bf16": 6, "int8": 4}))
    assert (plan.image, plan.text, plan.source) == ("int8", "int8", "measured")
    # Only the winner needed checking; its worst cosine is recorded.
    assert set(plan.quality["image"]) == {"int8"} and plan.quality["image"]["int8"]["passed"]
    assert plan.quality["image"]["int8"]["cosine"] >= autotune.COSINE_GATE


def test_a_mode_no_faster_than_fp32_by_the_margin_is_not_taken(model):
    plan = autotune.measure(model, timer=timer_from({"fp32": 10, "bf16": 9.8, "int8": 12}))
    assert (plan.image, plan.text) == ("fp32", "fp32")
    assert plan.quality == {"image": {}, "text": {}}  # nothing worth checking


def test_a_mode_that_fails_the_cosine_gate_loses_to_the_next_fastest(model, monkeypatch):
    # int8's image embeddings, pushed off along a direction orthogonal to each row: its cosine to the
    # unpushed row drops to 1 / sqrt(1 + 0.2^2) = 0.981, to float32's at most that plus int8's own
    # small angle, below the gate (0.995) whatever the weights.
    embed = autotune._Gates._embed

    def spoiled(self, tower, mode):
        z = embed(self, tower, mode)
        if (tower, mode) == ("image", "int8"):
            d = np.roll(z, 1, axis=1)
            d -= np.sum(d * z, 1, keepdims=True) * z  # orthogonal to each row
            z = z + 0.2 * d / np.linalg.norm(d, axis=1, keepdims=True)
        return z

    monkeypatch.setattr(autotune._Gates, "_embed", spoiled)
    plan = autotune.measure(model, timer=timer_from({"fp32": 10, "bf16": 6, "int8": 4}))
    assert plan.image == "bf16" and plan.text == "int8"
    q = plan.quality["image"]["int8"]
    assert not q["passed"] and q["cosine"] < 0.99
    assert plan.quality["image"]["bf16"]["passed"]


def test_when_the_pair_fails_agreement_the_smaller_gain_falls_back_to_fp32(model, monkeypatch):
    monkeypatch.setattr(autotune._Gates, "pair", lambda self, i, t: False)

    def timer(tower, mode, batch):
        return {"image": {"fp32": 10, "bf16": 5, "int8": 9}, "text": {"fp32": 10, "bf16": 8, "int8": 9}}[tower].get(mode, 20)

    plan = autotune.measure(model, timer=timer)
    assert (plan.image, plan.text) == ("bf16", "fp32")


def test_towers_too_small_to_matter_stay_fp32_without_timing(model):
    plan = autotune.measure(model)  # the parity checkpoint's towers hold ~2e4 replaceable weights
    assert (plan.image, plan.text) == ("fp32", "fp32") and plan.timings == {}


def test_apply_quantises_each_tower_as_planned(model):
    autotune.apply(model, autotune.Plan("int8", "bf16", "requested"))
    assert replaced(model.vision_model) == {Int8Linear}
    assert replaced(model.text_model) == {Bf16Linear}


# ---------------------------------------------------------------- remembering

def test_the_decision_is_remembered_and_read_back_without_timing(model):
    first = autotune.plan_for(model, timer=timer_from({"fp32": 10, "bf16": 4, "int8": 6}))
    assert first.source == "measured" and Path(first.path).is_file()
    again = timer_from({"fp32": 1, "bf16": 9, "int8": 9})
    second = autotune.plan_for(model, timer=again)
    assert again.calls == []
    assert (second.image, second.text, second.source) == ("bf16", "bf16", "cached")
    assert second.timings == first.timings and second.path == first.path
    record = json.loads(Path(first.path).read_text())
    assert record["key"]["cpu"] == autotune.cpu_model() and record["key"]["jax"] == autotune.machine()["jax"]


def test_another_cpu_or_jax_version_measures_again(model, monkeypatch):
    autotune.plan_for(model, timer=timer_from({"fp32": 10, "bf16": 4, "int8": 6}))
    real = autotune.machine()
    for change in ({"cpu": "Intel(R) Xeon(R) Platinum 8480+"}, {"flags": "0" * 16}, {"jax": "0.0.1"}):
        monkeypatch.setattr(autotune, "machine", lambda change=change: {**real, **change})
        timer = timer_from({"fp32": 10, "bf16": 6, "int8": 4})
        plan = autotune.plan_for(model, timer=timer)
        assert timer.calls and plan.source == "measured" and plan.image == "int8", change


def test_a_corrupt_decision_file_is_measured_again(model):
    path = autotune.decision_path(model)
    path.parent.mkdir(parents=True)
    path.write_text('{"image": "int4", "text"')
    timer = timer_from({"fp32": 10, "bf16": 4, "int8": 6})
    plan = autotune.plan_for(model, timer=timer)
    assert timer.calls and plan.source == "measured" and plan.image == "bf16"
    assert autotune.read_plan(path).image == "bf16"  # and rewritten whole


def test_koclip_precision_overrides_the_measurement(model, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "int8")
    timer = timer_from({"fp32": 1, "bf16": 9, "int8": 9})
    plan = autotune.plan_for(model, timer=timer)
    assert (plan.image, plan.text, plan.source) == ("int8", "int8", "KOCLIP_PRECISION") and timer.calls == []
    monkeypatch.setenv(autotune.ENV, "auto")
    assert autotune.plan_for(model, timer=timer).source == "measured"


def test_an_unknown_koclip_precision_names_the_valid_ones(model, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "fp16")
    with pytest.raises(ConfigError, match="KOCLIP_PRECISION='fp16'.*fp32, bf16, int8, ort-fp32, ort-int8, auto"):
        autotune.plan_for(model)


def test_load_auto_applies_the_remembered_plan_and_records_it(model):
    timings = {t: {"fp32": {1: 0.010, 8: 0.05}, "int8": {1: 0.004, 8: 0.02}} for t in autotune.TOWERS}
    autotune.write_plan(autotune.decision_path(model), autotune.Plan("int8", "bf16", "measured", 1.5, timings),
                        autotune.decision_key(model))
    fast, _ = koclip.load(str(PARITY), precision="auto")
    assert replaced(fast.vision_model) == {Int8Linear} and replaced(fast.text_model) == {Bf16Linear}
    plan = fast.load_info.precision
    assert (plan.image, plan.text, plan.source) == ("int8", "bf16", "cached")
    assert plan.summary() == "image int8, text bf16 (measured earlier on this CPU)"
    # The index fingerprint still names the float32 weights.
    assert fast.load_info.weights == koclip.fingerprint.model_digest(model)


# ---------------------------------------------------------------- the pieces

def test_timing_copy_keeps_few_layers_and_shares_the_arrays(model):
    short = autotune.timing_copy(model, layers=1)
    assert len(short.vision_model.encoder.layers) == 1 and len(short.text_model.encoder.layer) == 1
    assert short.vision_model.encoder.layers[0].mlp.fc1.kernel[...] is model.vision_model.encoder.layers[0].mlp.fc1.kernel[...]
    assert short.text_model.embeddings.word_embeddings.embedding[...] is \
        model.text_model.embeddings.word_embeddings.embedding[...]  # within TIMING_VOCAB rows: as it is


def test_timing_copy_keeps_the_first_rows_of_a_large_word_table(model):
    table = np.asarray(model.text_model.embeddings.word_embeddings.embedding[...])
    short = autotune.timing_copy(model, layers=1, vocab=10)
    assert short.config.text.vocab_size == 10
    np.testing.assert_array_equal(np.asarray(short.text_model.embeddings.word_embeddings.embedding[...]), table[:10])
    ids, mask = autotune.synthetic_tokens(short.config.text, 3, full=True)
    assert ids.max() < 10
    # What a text looks up is what the whole model looks up: the same first-layer embeddings.
    whole = autotune.timing_copy(model, layers=1, vocab=10**9)
    np.testing.assert_array_equal(np.asarray(short.text_features(ids, mask)),
                                  np.asarray(whole.text_features(ids, mask)))
    assert autotune.timing_copy(model, vocab=0).config.text.vocab_size == model.config.text.pad_token_id + 2


def test_synthetic_tokens_avoid_padding_inside_and_pad_after():
    from koclip.config import TINY

    ids, mask = autotune.synthetic_tokens(TINY.text, 16)
    assert ids.shape == mask.shape == (16, autotune.TEXT_LENGTH)
    lengths = mask.sum(1)
    assert lengths.min() >= 3 and np.all(mask == (np.arange(ids.shape[1]) < lengths[:, None]))
    assert np.all((ids == TINY.text.pad_token_id) == (mask == 0))


def test_agreement_counts_clear_rows_only():
    s0 = np.array([[0.5, 0.5 - 1e-6, 0.1], [0.9, 0.2, 0.1]])
    assert autotune.agreement(s0, np.array([[0.4, 0.5, 0.1], [0.9, 0.2, 0.1]])) == 1.0
    assert autotune.agreement(s0, np.array([[0.5, 0.4, 0.1], [0.2, 0.9, 0.1]])) == 0.0
    assert autotune.agreement(s0[:1], s0[:1][:, ::-1]) == 1.0  # every row a tie


def test_koclip_info_prints_the_machine_and_each_towers_choice(model, capsys):
    from koclip import cli

    autotune.write_plan(autotune.decision_path(model),
                        autotune.Plan("int8", "fp32", "measured", 2.0,
                                      timings={"image": {"fp32": {1: 0.010, 8: 0.05}, "int8": {1: 0.004, 8: 0.02}}}),
                        autotune.decision_key(model))
    assert cli.main(["info", "--model", str(PARITY)]) == 0
    out = capsys.readouterr().out
    assert f"machine: {autotune.cpu_model()}" in out
    assert "precision: image int8, text fp32 (measured earlier on this CPU)" in out
    assert "int8     batch 1 4.0 ms, batch 8 20.0 ms; score 0.40" in out


def test_int8_is_not_checked_where_bf16_already_fails(model, monkeypatch):
    embed = autotune._Gates._embed
    seen = []

    def spoiled(self, tower, mode):
        seen.append((tower, mode))
        z = embed(self, tower, mode)
        return -z if (tower, mode) == ("image", "bf16") else z  # cosine -1: fails

    monkeypatch.setattr(autotune._Gates, "_embed", spoiled)
    gates = autotune._Gates(model)
    assert not gates.check("image", "bf16") and not gates.check("image", "int8")
    assert ("image", "int8") not in seen and gates.quality["image"]["int8"]["passed"] is False
    assert gates.check("text", "int8")  # bf16 not checked there: int8 is


@pytest.mark.parametrize("name", ["siglip_spiece", "clip", "dual_vit_safetensors"])
def test_every_tower_kind_can_be_cut_timed_and_checked(name):
    """SigLIP (fixed-length text), CLIP's text tower and ViT: the timing copy keeps TIMING_LAYERS
    layers and shares the weights, and the gates run on the whole model."""
    model, _ = koclip.load(str(PARITY.parent / name))
    short = autotune.timing_copy(model, layers=1)
    for tower in autotune.TOWERS:
        cfg = short.config.text if tower == "text" else short.config.vision
        assert cfg.num_hidden_layers == 1
    plan = autotune.measure(model, timer=timer_from({"fp32": 10, "bf16": 6, "int8": 4}))
    for tower in autotune.TOWERS:
        assert plan.quality[tower], (tower, plan.quality)
        chosen = plan.mode(tower)
        assert chosen == "fp32" or plan.quality[tower][chosen]["passed"]
    length, full = autotune.text_shape(model.config)
    ids, mask = autotune.synthetic_tokens(model.config.text, 2, full=full, length=length)
    assert np.asarray(model.encode_text(ids, mask)).shape == (2, model.config.projection_dim)
