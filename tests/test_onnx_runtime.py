"""koclip.onnx_runtime: koclip's towers exported to ONNX and run by ONNX Runtime, and their place
among precision="auto"'s candidates.

Parity: the ort-fp32 export computes what koclip's float32 towers do, in another summation order
(ONNX Runtime's own matmul blocking and fused kernels), so the two agree within float32 rounding
bounds derived from the arithmetic (tests/numerics.py).  Quality: ort-int8 keeps the gates every
precision must keep (tests/test_quantize.py): cosine >= 0.995 to float32 per embedding, and zero-shot
top-1 agreement >= 99% over clear margins, the latter on koclip-mini's real weights (its text tower
is exportable; its EfficientNet is not).  No test measures speed.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import koclip  # noqa: E402
from koclip import autotune, data, onnx_runtime  # noqa: E402
from koclip.config import TINY, VisionConfig  # noqa: E402
from koclip.errors import ConfigError, KoclipError  # noqa: E402
from koclip.quantize import quantize, quantize_weights  # noqa: E402
from numerics import U32, reduction_rtol  # noqa: E402
from test_quantize import agreement, rows_cosine  # noqa: E402 - the gates' figures, as test_quantize defines them

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
COSINE_GATE = 0.995
AGREEMENT_GATE = 0.99
KO = [ko for ko, _ in data.ZEROSHOT_LABELS]
EN = [en for _, en in data.ZEROSHOT_LABELS]
# The tiny checkpoints: CLIP (quick_gelu) and ViT (gelu) image towers, both with RoBERTa text towers.
CHECKPOINTS = ["dual_clip_safetensors", "dual_vit_safetensors"]


def depth(layers: int) -> int:
    """Chained reductions in a tower, as tests/test_model.py counts them: 11 per layer (two layer
    norms' means and variances, q/k/v, scores, softmax, weighted values, output, MLP in and out) and 8
    around them (embedding or pre-layer norm, final layer norm or pooler, projection, L2 norm), plus
    one per layer for the activation, which ONNX Runtime evaluates with its own approximations of erf
    and the logistic function (a few float32 units each)."""
    return 12 * layers + 8


def fp32_bound(config, tower: str, length: int) -> float:
    """|z_ort - z_jax| per entry, for unit-length z: each side within reduction_rtol of the exact
    value, so twice that apart.  The longest sum: the patch pixels, the MLP width, the hidden width or
    the sequence (softmax, attention), whichever is longest."""
    if tower == "image":
        cfg = config.vision
        longest = max(cfg.num_channels * cfg.patch_size ** 2, cfg.intermediate_size, cfg.hidden_size,
                      (cfg.image_size // cfg.patch_size) ** 2 + 1)
    else:
        cfg = config.text
        longest = max(cfg.intermediate_size, cfg.hidden_size, length)
    return 2 * reduction_rtol(longest, depth=depth(cfg.num_hidden_layers))


@pytest.fixture(scope="module")
def models():
    return {name: koclip.load(str(PARITY / name)) for name in CHECKPOINTS}


@pytest.fixture(scope="module")
def photos():
    return [p.path for p in data.gallery()]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV, raising=False)


def tokens(processor):
    """Korean and English prompts, padded to one length bucket: rows of many lengths."""
    return processor(text=koclip.apply_template(KO) + koclip.apply_template(EN, "a photo of a {}."))


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fp32_export_matches_koclips_float32_towers_within_rounding(models, photos, name):
    model, processor = models[name]
    # 36 photos: more than one session call (32 rows at most per call).
    pixels = processor(images=photos)["pixel_values"]
    batch = tokens(processor)
    want_img = np.asarray(model.encode_image(pixels))
    want_txt = np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))
    got_img = np.asarray(onnx_runtime.session(model, "image", "ort-fp32")(pixels))
    got_txt = np.asarray(onnx_runtime.session(model, "text", "ort-fp32")(batch["input_ids"], batch["attention_mask"]))
    assert got_img.shape == want_img.shape == (len(photos), model.config.projection_dim)
    assert got_txt.shape == want_txt.shape
    np.testing.assert_allclose(got_img, want_img, rtol=0, atol=fp32_bound(model.config, "image", 0))
    length = batch["input_ids"].shape[1]
    np.testing.assert_allclose(got_txt, want_txt, rtol=0, atol=fp32_bound(model.config, "text", length))


def test_fp32_export_of_bert_positions_and_mean_pooling_matches(tmp_path):
    """BERT positions (0, 1, ...) and mean pooling over the real tokens (koclip-mini's e5 text tower)."""
    from flax import nnx

    config = TINY.replace(text=dataclasses.replace(TINY.text, kind="bert", pooling="mean", positions="arange"),
                          head="affine")
    model = koclip.KoCLIP(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, config.text.vocab_size, (5, 16)).astype(np.int32)
    mask = (np.arange(16)[None] < np.array([16, 3, 9, 1, 12])[:, None]).astype(np.int32)
    ids[mask == 0] = config.text.pad_token_id
    want = np.asarray(model.encode_text(ids, mask))
    got = np.asarray(onnx_runtime.session(model, "text", "ort-fp32")(ids, mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=fp32_bound(config, "text", 16))


def test_an_empty_batch_gives_no_rows(models):
    model, _ = models["dual_clip_safetensors"]
    runner = onnx_runtime.session(model, "text", "ort-fp32")
    z = runner(np.zeros((0, 8), np.int32), np.zeros((0, 8), np.int32))
    assert z.shape == (0, model.config.projection_dim)


# ---------------------------------------------------------------- int8

def test_int8_export_holds_koclips_int8_codes(models):
    model, _ = models["dual_clip_safetensors"]
    _, external = onnx_runtime.export(model, "image", "ort-int8")
    fc1 = np.asarray(model.vision_model.encoder.layers[0].mlp.fc1.kernel[...])
    q, scale = quantize_weights(fc1)
    codes = [a for a in external.values() if a.dtype == np.int8 and a.shape == q.shape]
    assert any(np.array_equal(a, q) for a in codes)
    assert any(a.dtype == np.float32 and np.array_equal(a, scale) for a in external.values())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_an_int8_export_of_a_tower_quantised_in_place_is_the_one_of_its_float32_weights(models, photos, name):
    # What attach builds for ort-int8 (the JAX tower quantised first, its codes exported) is the graph
    # exported from the float32 weights: the same codes and scales, so the same embeddings bit for bit.
    model, processor = models[name]
    pixels = processor(images=photos[:4])["pixel_values"]
    batch = tokens(processor)
    want_img = np.asarray(onnx_runtime.session(model, "image", "ort-int8")(pixels))
    want_txt = np.asarray(onnx_runtime.session(model, "text", "ort-int8")(batch["input_ids"], batch["attention_mask"]))
    q = quantize(model, "int8")  # a copy, every tower in int8
    np.testing.assert_array_equal(np.asarray(onnx_runtime.session(q, "image", "ort-int8")(pixels)), want_img)
    np.testing.assert_array_equal(
        np.asarray(onnx_runtime.session(q, "text", "ort-int8")(batch["input_ids"], batch["attention_mask"])), want_txt)
    with pytest.raises(KoclipError, match="ort-fp32 needs the float32 weights"):
        onnx_runtime.export(q, "text", "ort-fp32")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_query_key_and_value_from_one_activation_quantisation_change_no_bit(models, photos, name, monkeypatch):
    model, processor = models[name]
    pixels = processor(images=photos[:4])["pixel_values"]
    batch = tokens(processor)
    q = quantize(model, "int8")  # int8 codes in every layer, as apply leaves a served tower

    def run(m):
        return (np.asarray(onnx_runtime.session(m, "image", "ort-int8")(pixels)),
                np.asarray(onnx_runtime.session(m, "text", "ort-int8")(batch["input_ids"], batch["attention_mask"])))

    def quantisations():
        proto, _ = onnx_runtime.export(q, "text", "ort-int8")
        return sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)

    shared, shared_quantisations = run(q), quantisations()
    one_by_one = onnx_runtime._Graph.dense_all
    monkeypatch.setattr(onnx_runtime._Graph, "dense_all",  # each layer quantises its input itself
                        lambda g, x, ms, rows=None: [one_by_one(g, x, [m], rows)[0] for m in ms])
    # 3 a layer -> 1; where the first token is pooled the last layer's query quantises its row apart (3 -> 2)
    first_pooled = model.config.text.pooling in ("pooler", "cls")
    assert quantisations() - shared_quantisations == 2 * model.config.text.num_hidden_layers - first_pooled
    for a, b in zip(shared, run(q)):
        np.testing.assert_array_equal(a, b)


def test_an_int8_layer_computes_koclips_int8_arithmetic():
    """The same codes (weights per column, activations per row) and an exact integer product: what is
    left is the rescale, two float32 products on each side (in another order), and the bias: each side
    within 3 roundings of the exact value, relative to |product| + |bias|.  (ONNX Runtime rounds x / s
    where koclip rounds x * (1 / s): a code one step apart where the two fall on either side of a
    half, about one activation in a million; none in this input, which the test checks first.)"""
    import jax.numpy as jnp

    from koclip.quantize import int8_matmul

    rng = np.random.default_rng(0)
    k, n = 64, 48
    kernel = rng.standard_normal((k, n)).astype(np.float32)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    x = (rng.standard_normal((35, k)) * np.geomspace(1e-3, 1e3, 35)[:, None]).astype(np.float32)
    x[0] = 0  # an all-zero row: codes 0
    s = np.abs(x).max(axis=1, keepdims=True) * np.float32(1 / 127)
    s[0] = 1
    assert np.array_equal(np.round(x / s), np.round(x * (np.float32(1) / s)))
    g = onnx_runtime._Graph("ort-int8")
    y = g.linear("x", kernel, bias)
    proto = g.model([g.helper.make_tensor_value_info("x", g.TensorProto.FLOAT, ["batch", k])], y, n, "linear")
    assert {node.op_type for node in proto.graph.node} >= {"QuantizeLinear", "MatMulIntegerToFloat"}
    got = onnx_runtime.inference_session(proto, g.external).run(None, {"x": x})[0]
    q, scale = quantize_weights(kernel)
    want = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), jnp.asarray(bias)))
    magnitude = np.abs(want.astype(np.float64) - bias) + np.abs(bias)
    assert np.all(np.abs(got.astype(np.float64) - want) <= 6 * U32 * magnitude), np.abs(got - want).max()
    np.testing.assert_array_equal(got[0], bias)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_int8_export_keeps_the_cosine_gate_on_the_tiny_checkpoints(models, photos, name):
    model, processor = models[name]
    pixels = processor(images=photos)["pixel_values"]
    batch = tokens(processor)
    for tower, args in (("image", (pixels,)), ("text", (batch["input_ids"], batch["attention_mask"]))):
        ref = np.asarray(model.encode_image(*args) if tower == "image" else model.encode_text(*args))
        z = np.asarray(onnx_runtime.session(model, tower, "ort-int8")(*args))
        cos = rows_cosine(z, ref)
        assert cos.min() >= COSINE_GATE, f"{name} {tower}: worst cosine {cos.min():.5f} at row {cos.argmin()}"


@pytest.mark.slow
def test_on_koclip_minis_real_text_tower_ort_fp32_keeps_the_gates(mini, photos):
    """koclip-mini's e5 text tower (real weights, real labels) exported in float32: cosine and zero-shot
    agreement against koclip's float32 tower, with the gallery's float32 image embeddings."""
    model, processor = mini
    zimg = np.asarray(model.encode_image(processor(images=photos)["pixel_values"]))
    runner = onnx_runtime.session(model, "text", "ort-fp32")
    for labels, template in ((KO, koclip.DEFAULT_TEMPLATE), (EN, "a photo of a {}.")):
        t = processor(text=koclip.apply_template(labels, template))
        ztxt0 = np.asarray(model.encode_text(t["input_ids"], t["attention_mask"]))
        ztxt = np.asarray(runner(t["input_ids"], t["attention_mask"]))
        assert rows_cosine(ztxt, ztxt0).min() >= COSINE_GATE
        s0, s = zimg @ ztxt0.T, zimg @ ztxt.T
        assert agreement(s0, s) >= AGREEMENT_GATE, f"{template}: agreement {agreement(s0, s):.3f}"


@pytest.mark.slow
def test_on_koclip_minis_real_text_tower_ort_int8_scores_the_gates_as_koclips_int8(mini):
    """autotune checks ort-int8 as koclip's int8: the same codes and arithmetic, float32 rounding
    apart.  On real weights the rounding apart is not nothing: now and then a token's activation code
    lands one step away, the step moves the next layer's inputs, and the difference grows from layer
    to layer.  On koclip-mini's text tower a row comes out either identical to koclip's int8 or about
    as far from it (cosine ~0.996, measured) as int8 is from float32, so the two are two draws of the
    same rounding noise.  Which rows diverge depends on the CPU's float rounding, so what is checked is
    what holds for any second draw: the real session's smallest cosine to float32 is int8's within
    int8's own distance from float32 (a draw of noise of one size cannot move it by more), and its
    zero-shot agreement is int8's to two images (an image whose two best labels are close may swap in
    one draw and not in the other: one of 34 did in one measurement, none in another).  A broken
    graph lands far outside both.  koclip-mini's text tower fails the cosine gate either way (0.9936,
    measured on Zen 4); fp32's export passes."""
    gates = autotune._Gates(mini[0])
    assert gates.check("text", "ort-fp32"), gates.quality
    int8 = gates.check("text", "int8")
    assert gates.check("text", "ort-int8") == int8 and gates.quality["text"]["ort-int8"] == gates.quality["text"]["int8"]
    pixels, (ids, mask) = gates._inputs()
    real = np.asarray(onnx_runtime.session(mini[0], "text", "ort-int8")(ids, mask))
    ref = gates.ref()
    cosine = float(rows_cosine(real, ref["text"]).min())
    int8_cosine = gates.quality["text"]["int8"]["cosine"]
    assert abs(cosine - int8_cosine) <= 1 - int8_cosine
    s0 = ref["image"] @ ref["text"].T
    top2 = np.sort(s0, axis=-1)[:, -2:]
    one_image = 1 / int(np.sum(top2[:, 1] - top2[:, 0] >= autotune.TIE))
    assert abs(agreement(s0, ref["image"] @ real.T) - gates.quality["text"]["int8"]["agreement"]) <= 2 * one_image + 1e-9


# ---------------------------------------------------------------- serving

def _thread_ticks(tids) -> int:
    """CPU time (user + system, in clock ticks) of this process's threads `tids` (Linux /proc)."""
    total = 0
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread has ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads' CPU time from Linux's /proc")
def test_a_session_stops_its_threads_spinning_when_a_run_ends():
    """Worker threads spin during a run and stop at its end (SESSION_CONFIG): between calls a
    session's threads take no CPU.  Without the stop, ONNX Runtime's worker here kept spinning for
    about 44 ms of CPU in the half second after a run.  Only the threads the session started are
    counted, so other work in the test process does not enter."""
    import os
    import time

    rng = np.random.default_rng(0)
    g = onnx_runtime._Graph("ort-int8")
    y = g.linear("x", rng.standard_normal((256, 256)).astype(np.float32))
    proto = g.model([g.helper.make_tensor_value_info("x", g.TensorProto.FLOAT, ["batch", 256])], y, 256, "linear")
    before = set(os.listdir("/proc/self/task"))
    session = onnx_runtime.inference_session(proto, g.external, n_threads=2)
    workers = set(os.listdir("/proc/self/task")) - before
    assert workers, "the session started no worker thread"
    x = rng.standard_normal((512, 256)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    ticks = _thread_ticks(workers)
    time.sleep(0.5)
    # A tick is 1 / SC_CLK_TCK s (10 ms on Linux): one tick of rounding is allowed, spinning would be ~4.
    assert _thread_ticks(workers) - ticks <= 1


def test_attach_serves_encode_through_the_session_and_keeps_jax_for_features(models):
    model, processor = models["dual_clip_safetensors"]
    m = quantize(model, "fp32")  # a copy: the module's model stays on JAX
    batch = processor(text=["고양이", "강아지"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    features = np.asarray(m.text_features(ids, mask))
    onnx_runtime.attach(m, "text", "ort-int8")
    runner = m.served_by("text")
    assert isinstance(runner, onnx_runtime.OrtTower) and runner.mode == "ort-int8"
    assert m.served_by("image") is None
    np.testing.assert_array_equal(np.asarray(m.encode_text(ids, mask)), np.asarray(runner(ids, mask)))
    np.testing.assert_array_equal(np.asarray(m.text_features(ids, mask)), features)  # JAX, unchanged
    assert model.served_by("text") is None
    m.serve("text", None)
    np.testing.assert_array_equal(np.asarray(m.encode_text(ids, mask)), np.asarray(model.encode_text(ids, mask)))


def test_load_with_an_ort_precision_serves_both_towers():
    model, processor = koclip.load(str(PARITY / "dual_clip_safetensors"), precision="ort-int8")
    plan = model.load_info.precision
    assert (plan.image, plan.text, plan.source) == ("ort-int8", "ort-int8", "requested")
    assert model.served_by("image").mode == model.served_by("text").mode == "ort-int8"
    assert plan.summary() == "ort-int8 (requested)"
    # The JAX towers hold the session's int8 codes, not a second float32 copy; an index's
    # fingerprint still names the float32 weights.
    assert koclip.precision_of(model) == "int8"
    fp32, _ = koclip.load(str(PARITY / "dual_clip_safetensors"))
    assert model.load_info.weights == koclip.fingerprint.model_digest(fp32)


def test_koclip_precision_forces_an_ort_mode(monkeypatch):
    monkeypatch.setenv(autotune.ENV, "ort-fp32")
    model, _ = koclip.load(str(PARITY / "dual_vit_safetensors"), precision="auto")
    plan = model.load_info.precision
    assert (plan.image, plan.text, plan.source) == ("ort-fp32", "ort-fp32", autotune.ENV)
    assert model.served_by("image").mode == "ort-fp32"


def test_an_ort_mode_on_a_tower_that_cannot_be_exported_runs_in_jax_at_that_precision():
    config = TINY.replace(vision=VisionConfig(kind="efficientnet", image_size=32, patch_size=1, variant="tiny"),
                          head="affine")
    model = types.SimpleNamespace(config=config)
    assert not onnx_runtime.exportable(config, "image") and onnx_runtime.exportable(config, "text")
    assert autotune.runnable(model, "image", "ort-int8") == "int8"
    assert autotune.runnable(model, "text", "ort-int8") == "ort-int8"
    assert autotune.candidates(model, "image") == ["fp32", "bf16", "int8"]
    assert autotune.candidates(model, "text") == ["fp32", "bf16", "int8", "ort-int8"]


def test_exporting_an_unsupported_tower_names_the_exportable_kinds(models):
    model, _ = koclip.load(str(PARITY / "siglip_spiece"))
    with pytest.raises(KoclipError, match="cannot export a siglip text tower.*bert, roberta"):
        onnx_runtime.export(model, "text")
    with pytest.raises(KoclipError, match="'ort-int4'.*ort-fp32, ort-int8"):
        onnx_runtime.export(models["dual_clip_safetensors"][0], "text", "ort-int4")


def test_an_ort_koclip_precision_without_onnxruntime_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(onnx_runtime, "available", lambda: False)
    monkeypatch.setenv(autotune.ENV, "ort-int8")
    with pytest.raises(ConfigError, match=r"pip install 'koclip\[onnx\]'"):
        autotune.forced_mode()


# ---------------------------------------------------------------- chosen by measurement

@pytest.fixture
def sessions_built(monkeypatch):
    """How many ONNX Runtime sessions of whole towers are built (a list of their (tower, mode))."""
    built = []
    init = onnx_runtime.OrtTower.__init__

    def counted(self, proto, external, tower, mode, n_threads=None):
        built.append((tower, mode))
        init(self, proto, external, tower, mode, n_threads)

    monkeypatch.setattr(onnx_runtime.OrtTower, "__init__", counted)
    return built


def test_auto_picks_ort_int8_where_it_is_fastest_and_serves_it_from_int8_codes(models, sessions_built):
    model, processor = models["dual_clip_safetensors"]
    m = quantize(model, "fp32")
    ms = {"image": {"fp32": 10, "bf16": 8, "int8": 7, "ort-int8": 4},
          "text": {"fp32": 10, "bf16": 6, "int8": 7, "ort-int8": 20}}
    asked = []

    def timer(tower, mode, batch):
        asked.append(mode)
        return ms[tower][mode] / 1e3

    plan = autotune.plan_for(m, timer=timer)
    assert "ort-fp32" not in asked  # only when asked for (AUTO_ORT)
    assert (plan.image, plan.text, plan.source) == ("ort-int8", "bf16", "measured")
    assert plan.quality["image"]["ort-int8"]["passed"]
    assert sessions_built == []  # checked as int8: no session built while measuring
    autotune.apply(m, plan)
    assert sessions_built == [("image", "ort-int8")]
    assert m.served_by("image").mode == "ort-int8" and m.served_by("text") is None
    assert koclip.precision_of(m) != "fp32"  # the JAX towers are quantised: the image one holds the codes
    assert "ort-int8 batch 1 4.0 ms" in "\n".join(plan.details())
    # Remembered, and served again on the next load.
    fast, _ = koclip.load(str(PARITY / "dual_clip_safetensors"), precision="auto")
    again = fast.load_info.precision
    assert (again.image, again.text, again.source) == ("ort-int8", "bf16", "cached")
    assert fast.served_by("image").mode == "ort-int8" and fast.served_by("text") is None


def test_an_ort_mode_that_fails_the_gates_loses_and_no_session_is_built(models, monkeypatch, sessions_built):
    model, _ = models["dual_clip_safetensors"]
    m = quantize(model, "fp32")
    embed = autotune._Gates._embed

    def spoiled(self, tower, mode):
        z = embed(self, tower, mode)
        return -z if mode == "ort-int8" else z  # cosine -1: fails

    monkeypatch.setattr(autotune._Gates, "_embed", spoiled)
    ms = {"fp32": 10, "bf16": 6, "int8": 7, "ort-int8": 4}
    plan = autotune.measure(m, timer=lambda tower, mode, batch: ms[mode] / 1e3)
    assert (plan.image, plan.text) == ("bf16", "bf16")
    assert not plan.quality["image"]["ort-int8"]["passed"]
    assert sessions_built == []


def test_the_decision_key_names_onnxruntimes_version(models):
    model, _ = models["dual_clip_safetensors"]
    key = autotune.decision_key(model)
    assert key["onnxruntime"] == onnx_runtime.version() and key["version"] == autotune.VERSION >= 2


def test_koclip_info_names_onnxruntime_and_the_ort_choice(models, capsys):
    from koclip import cli

    model, _ = models["dual_clip_safetensors"]
    timings = {"image": {"fp32": {1: 0.010, 8: 0.05}, "ort-int8": {1: 0.004, 8: 0.02}}}
    autotune.write_plan(autotune.decision_path(model), autotune.Plan("ort-int8", "fp32", "measured", 2.0, timings),
                        autotune.decision_key(model))
    assert cli.main(["info", "--model", str(PARITY / "dual_clip_safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"onnxruntime {onnx_runtime.version()}" in out
    assert "precision: image ort-int8, text fp32 (measured earlier on this CPU)" in out
    assert "ort-int8 batch 1 4.0 ms, batch 8 20.0 ms; score 0.40" in out
