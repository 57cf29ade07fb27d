"""koclip.train: config, optimiser, data pipeline, data parallelism, resumption, LiT features.

Runs use the TINY architecture on 32x32 images and captions the tests make,
with a character-level tokenizer built here.  Subprocess runs share a JAX
compilation cache in pytest's cache folder, so only the first run of the
first session compiles.
"""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koclip.train.config import ConfigError, TrainConfig, load_config, parse_override
from numerics import U32, UBF16, assert_trees_close, reduction_rtol

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"빨간": (220, 40, 40), "파란": (40, 70, 220), "초록": (40, 170, 70), "노란": (230, 200, 30)}


def make_data(root: Path, n: int = 40, n_val: int = 8) -> dict:
    """n 32x32 PNGs of a coloured square on noise, JSONL caption files, a character tokenizer."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        a = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        lo = rng.integers(0, 12)
        a[lo:lo + 20, lo:lo + 20] = rgb
        Image.fromarray(a).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "captions": [f"{name} 네모", f"{name}색 그림", f"네모 하나 {name}"]})
    for split, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in part) + "\n")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted({c for r in rows for cap in r["captions"] for c in cap}):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(root / "tok"))
    return {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "tokenizer": str(root / "tok")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run_env(request, tmp_path_factory):
    # Compiled programs are kept in pytest's cache folder: later runs (and sessions) skip XLA compiles.
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("jax_compilation_cache") if cache else tmp_path_factory.mktemp("jax_cache")
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    # A single-process run: no fake devices and no multi-process coordinator from the caller's shell.
    for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def tiny_cfg(data, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer=data["tokenizer"], train_data=data["train"], val_data=data["val"],
                batch_size_per_device=8, num_epochs=2, learning_rate=1e-3, warmup_steps=2,
                checkpoint_every_steps=5, log_every_steps=2, eval_batch_size=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def cli_args(data, workdir, *extra):
    sets = {"synthetic_examples": 0, "train_data": data["train"], "val_data": data["val"],
            "tokenizer": data["tokenizer"], "num_epochs": 6, "eval_batch_size": 8, "progress": "false",
            "checkpoint_every_steps": 6, "log_every_steps": 4}
    args = [sys.executable, "-m", "koclip.train", "--config", str(ROOT / "configs" / "tiny.py"),
            "--workdir", str(workdir)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


# ---------------------------------------------------------------- config


def test_set_overrides_convert_to_the_field_type():
    assert parse_override("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert parse_override("num_epochs=7") == ("num_epochs", 7)
    assert parse_override("local_negatives=true") == ("local_negatives", True)
    assert parse_override("freeze=vision_model/.*,text_model/embeddings/.*") == (
        "freeze", ("vision_model/.*", "text_model/embeddings/.*"))


def test_unknown_config_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_override("learnin_rate=1")


def test_every_preset_loads_and_overrides_the_defaults():
    presets = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "default"))
    assert {p.stem for p in presets} >= {"koclip_base", "koclip_large", "koclip_mini", "fashion_mnist", "tiny"}
    for p in presets:
        assert load_config(p) != TrainConfig(), p
    base = load_config(ROOT / "configs" / "koclip_base.py", ["num_epochs=1"])
    assert (base.batch_size_per_device, base.learning_rate, base.weight_decay, base.max_length) == (64, 5e-5, 0.1, 96)
    assert (base.schedule, base.num_epochs) == ("linear", 1)


def test_koclip_command_has_train_and_eval():
    from koclip.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--config", "configs/tiny.py", "--set", "seed=3", "--set", "num_epochs=1"])
    assert args.overrides == ["seed=3", "num_epochs=1"] and args.func.__module__ == "koclip.train.cli"
    args = parser.parse_args(["eval", "zeroshot", "--model", "m", "--dataset", "fashion-mnist"])
    assert args.func.__module__ == "koclip.evaluation.cli"


# ---------------------------------------------------------------- optimiser


@pytest.fixture(scope="module")
def tiny_model():
    from koclip.config import TINY
    from koclip.train.train import numpy_initialised

    return numpy_initialised(TINY, 0)


def test_weight_decay_skips_biases_norms_and_logit_scale(tiny_model):
    from flax import nnx

    from koclip.train.optim import decay_mask, path_of

    params = {"model": nnx.state(tiny_model, nnx.Param), "loss": {"logit_bias": jnp.zeros(())}}
    flat, _ = jax.tree_util.tree_flatten_with_path(decay_mask(params, TrainConfig().no_decay))
    mask = {path_of(kp): v for kp, v in flat}
    assert mask["model/text_model/encoder/layer/0/attention/self/query/kernel"] is True
    assert mask["model/text_model/embeddings/word_embeddings/embedding"] is True
    assert mask["model/text_model/encoder/layer/0/attention/self/query/bias"] is False
    assert mask["model/text_model/embeddings/LayerNorm/scale"] is False
    assert mask["model/vision_model/pre_layrnorm/scale"] is False
    assert mask["model/logit_scale"] is False
    assert mask["loss/logit_bias"] is False


def _paths(tree) -> set:
    from koclip.train.optim import path_of

    return {path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_freeze_patterns_leave_matching_params_out_of_training(tiny_model):
    from koclip.train.optim import make_optimizer
    from koclip.train.train import create_train_state

    cfg = TrainConfig(freeze=("vision_model/.*", "logit_scale"))
    _, state = create_train_state(tiny_model, cfg, make_optimizer(cfg, 10))
    trainable, frozen = _paths(state.params), _paths(state.frozen)
    assert not any(p.startswith("model/vision_model/") for p in trainable)
    assert "model/logit_scale" not in trainable and "logit_scale" in frozen
    assert "vision_model/post_layernorm/scale" in frozen
    assert {"model/visual_projection/kernel", "model/text_model/pooler/dense/kernel"} <= trainable


def test_schedule_warms_up_then_decays():
    from koclip.train.optim import learning_rate_schedule

    cos = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine"), 110)
    assert [float(cos(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])  # each exact in float32
    # float32: pi * 50 / 100 carries 3 roundings (3u of pi / 2); cos adds its own (4u, as XLA's within a
    # few ulp), then 1 + (u) and the power 1.0 (4u of 0.5).  At the end, cos(pi + e) = -1 + e^2 / 2.
    cos_atol = 3 * U32 * math.pi / 2 + 4 * U32 + U32 + 4 * U32 * 0.5
    assert float(cos(60)) == pytest.approx(0.5, abs=cos_atol)  # half-way down the cosine
    assert float(cos(110)) == pytest.approx(0.0, abs=cos_atol)
    lin = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=0, schedule="linear",
                                             end_learning_rate=0.1), 10)
    # 0.9 * frac + 0.1 in float32: 0.9 and 0.1 rounded, one product, one sum: under 3u relative.
    assert [float(lin(s)) for s in (0, 5, 10)] == pytest.approx([1.0, 0.55, 0.1], rel=3 * U32)


# ---------------------------------------------------------------- heads started afresh (configs/koclip_mini.py)


@pytest.fixture(scope="module")
def conse_model():
    """A KoCLIP with koclip-mini's kind of head ("conse") at test size: TINY's 32-wide text tower and
    the tiny EfficientNet (160 features, 10 classes), 3 classes per ConSE image embedding."""
    from koclip.config import TINY, ModelConfig, VisionConfig
    from koclip.train.train import numpy_initialised

    vision = VisionConfig(kind="efficientnet", image_size=32, patch_size=1, variant="tiny")
    return numpy_initialised(ModelConfig(text=TINY.text, vision=vision, projection_dim=2 * TINY.text.output_dim,
                                         head="conse", conse_top_k=3, max_length=16))


def _head_params(model) -> dict:
    from flax import nnx

    from koclip.train.optim import path_of

    heads = {"text_projection": model.text_projection, "visual_projection": model.visual_projection}
    return {f"{name}/{path_of(kp)}": np.asarray(x) for name, head in heads.items()
            for kp, x in jax.tree_util.tree_flatten_with_path(nnx.state(head, nnx.Param))[0]}


@pytest.fixture
def fitted_conse_model(conse_model):
    """A copy of `conse_model` whose head parameters and temperature stand for fitted ones: values in
    [1.5, 2.5], which no freshly started head parameter takes."""
    from flax import nnx

    model = nnx.merge(*nnx.split(conse_model))
    rng = np.random.default_rng(5)
    for head in (model.text_projection, model.visual_projection):
        for p in vars(head).values():
            if isinstance(p, nnx.Param):
                p[...] = jnp.asarray(rng.uniform(1.5, 2.5, p[...].shape), jnp.float32)
    model.logit_scale[...] = jnp.asarray(2.0, jnp.float32)
    return model


CONSE_HEAD_PARAMS = {"text_projection/mean", "text_projection/kernel", "text_projection/blend",
                     "visual_projection/mean", "visual_projection/kernel", "visual_projection/class_embeddings",
                     "visual_projection/temperature", "visual_projection/blend"}


def test_koclip_mini_config_starts_every_conse_head_parameter_afresh(monkeypatch, fitted_conse_model):
    from koclip.towers.conse import ImageHead, TextHead
    from koclip.train import train

    cfg = load_config(ROOT / "configs" / "koclip_mini.py")
    assert (cfg.model, cfg.reinit_heads, cfg.tokenizer) == ("koclip-mini", True, "")
    # Building koclip-mini's tower cache takes minutes: the config's model name loads the small ConSE model.
    monkeypatch.setattr(train, "load", {"koclip-mini": (fitted_conse_model, None)}.__getitem__)
    before = _head_params(fitted_conse_model)
    model, _ = train.build_model(cfg)
    after = _head_params(model)
    assert before.keys() == after.keys() == CONSE_HEAD_PARAMS
    assert [k for k in before if np.any(after[k] == before[k])] == []  # nothing of the fitted heads is kept
    # Matrices: drawn from normal(0, 0.02).  n draws give a mean within 6 sigma / sqrt(n) of 0 and a
    # standard deviation within 6 / sqrt(2 n) of sigma, relative (its standard error is sigma / sqrt(2 n)).
    for k in ("text_projection/kernel", "visual_projection/kernel", "visual_projection/class_embeddings"):
        n = after[k].size
        assert abs(after[k].mean()) < 6 * 0.02 / math.sqrt(n), k
        assert after[k].std() / 0.02 == pytest.approx(1.0, abs=6 / math.sqrt(2 * n)), k
    # Every other parameter: the value a newly built head holds.
    built = {"text_projection": TextHead(32), "visual_projection": ImageHead(160, 10, 32, 3)}
    for k in CONSE_HEAD_PARAMS - {"text_projection/kernel", "visual_projection/kernel",
                                  "visual_projection/class_embeddings"}:
        head, name = k.split("/")
        np.testing.assert_array_equal(after[k], np.asarray(getattr(built[head], name)[...]), err_msg=k)
    assert float(model.logit_scale[...]) == np.float32(model.config.logit_scale_init)


def test_conse_heads_started_afresh_have_finite_nonzero_gradients(fitted_conse_model):
    # Why the matrices are drawn rather than rebuilt: a newly built ConSE image head (zero matrices) maps every
    # image to 0, whose L2 normalisation has NaN gradients.
    from koclip.train.optim import make_optimizer, path_of
    from koclip.train.train import StepOptions, create_train_state, loss_and_grads, reinit_heads

    cfg = load_config(ROOT / "configs" / "koclip_mini.py")
    reinit_heads(fitted_conse_model, cfg.seed)
    graphdef, state = create_train_state(fitted_conse_model, cfg, make_optimizer(cfg, 10))
    # Both towers precomputed (features="both"): only the heads and the temperature train.
    assert _paths(state.params) == {f"model/{k}" for k in CONSE_HEAD_PARAMS} | {"model/logit_scale"}
    rng = np.random.default_rng(0)
    batch = {"image_feats": rng.normal(size=(8, 160)).astype(np.float32),
             "text_feats": rng.normal(size=(8, 32)).astype(np.float32), "valid": np.ones(8, bool)}
    fn = jax.jit(functools.partial(loss_and_grads, graphdef=graphdef, opts=StepOptions.from_config(cfg, 1)))
    loss, grads = fn(state, batch)
    assert math.isfinite(float(loss))
    flat = {path_of(kp): np.asarray(g) for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert [k for k, g in flat.items() if not (np.isfinite(g).all() and np.any(g != 0))] == []


# ---------------------------------------------------------------- data pipeline


def _batches(dataset_path_or_ds, tokenizer_dir, batch_size=8, **kw):
    from koclip.config import TINY
    from koclip.evaluation.datasets import read_captions
    from koclip.processing import image_spec_for
    from koclip.tokenizer import load_tokenizer
    from koclip.train.data import Batches, fixed_length_tokenizer

    ds = read_captions(dataset_path_or_ds) if isinstance(dataset_path_or_ds, str) else dataset_path_or_ds
    tok = load_tokenizer(tokenizer_dir, Path(tokenizer_dir))
    return Batches(ds, batch_size, image_spec=image_spec_for(TINY), tokenize=fixed_length_tokenizer(tok, 16),
                   **kw)


def test_order_and_captions_depend_only_on_seed_and_epoch(data):
    a, b = _batches(data["train"], data["tokenizer"], seed=3), _batches(data["train"], data["tokenizer"], seed=3)
    np.testing.assert_array_equal(a.order(1), b.order(1))
    np.testing.assert_array_equal(a.caption_choice(1), b.caption_choice(1))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.caption_choice(0), a.caption_choice(1))
    assert not np.array_equal(a.order(0), _batches(data["train"], data["tokenizer"], seed=4).order(0))


def test_prefetched_batches_equal_batches_built_one_by_one(data):
    b = _batches(data["train"], data["tokenizer"], seed=1)
    streamed = list(b(2, start=1))
    assert len(streamed) == b.steps_per_epoch - 1
    for step, got in enumerate(streamed, start=1):
        want = b.batch(2, step)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert {v.shape for s in streamed for k, v in s.items() if k == "pixel_values"} == {(8, 32, 32, 3)}
    assert {v.shape for s in streamed for k, v in s.items() if k == "input_ids"} == {(8, 16)}


def test_closing_the_batch_stream_early_stops_its_decoding_threads(data):
    b = _batches(data["train"], data["tokenizer"], num_workers=2, prefetch=2)
    assert b.steps_per_epoch > 3
    stream = b(0)
    next(stream)
    stream.close()  # what a run stopping mid-epoch does (or garbage collection, for a dropped stream)
    assert not [t for t in threading.enumerate() if t.name.startswith("koclip-data")]


def test_undecodable_image_is_masked_counted_and_skipped(tmp_path, data):
    rows = [json.loads(line) for line in Path(data["train"]).read_text().splitlines()][:8]
    for r in rows:
        r["image"] = str(Path(data["train"]).parent / r["image"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows[5]["image"] = str(tmp_path / "broken.png")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    b = _batches(str(tmp_path / "d.jsonl"), data["tokenizer"])
    (batch,) = list(b(0))
    assert batch["valid"].sum() == 7
    assert b.bad_images == {5}
    assert batch["pixel_values"][~batch["valid"]].max() == 0.0


def test_evaluation_batches_pad_the_last_batch_and_mask_it(data):
    b = _batches(data["val"], data["tokenizer"], batch_size=5, train=False)
    batches = list(b(0))
    assert [x["valid"].tolist() for x in batches] == [[True] * 5, [True] * 3 + [False] * 2]


# ---------------------------------------------------------------- steps on cached features (cheap to compile)


def _feature_state(tiny_model, **cfg_kw):
    from flax import nnx

    from koclip.train.optim import make_optimizer
    from koclip.train.train import create_train_state

    cfg = TrainConfig(features="both", learning_rate=1e-2, **cfg_kw)
    tx = make_optimizer(cfg, 10)
    model = nnx.merge(*nnx.split(tiny_model))  # a copy: create_train_state may not alter the fixture
    graphdef, state = create_train_state(model, cfg, tx)
    rng = np.random.default_rng(0)
    batch = {"image_feats": rng.normal(size=(8, 32)).astype(np.float32),
             "text_feats": rng.normal(size=(8, 32)).astype(np.float32), "valid": np.ones(8, bool)}
    return cfg, tx, graphdef, state, batch


def test_gradient_accumulation_updates_every_k_batches(tiny_model):
    from koclip.train.train import StepOptions, train_step

    cfg, tx, graphdef, state, batch = _feature_state(tiny_model, grad_accum_steps=2)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, opts=StepOptions()))
    kernel = lambda s: np.asarray(s.params["model"]["visual_projection"]["kernel"][...])  # noqa: E731
    s1, _ = step(state, batch)
    np.testing.assert_array_equal(kernel(s1), kernel(state))
    s2, _ = step(s1, batch)
    # AdamW's first update moves an entry by about lr * g / (|g| + eps) ~ lr = 1e-2; no update leaves the
    # kernel bit-identical (as after s1).  1e-4 lies far between the two.
    assert np.abs(kernel(s2) - kernel(state)).max() > 1e-4


def _bf16_loss_bound(graphdef, state, batch) -> float:
    """First-order bound on |bf16 loss - fp32 loss| for the feature batch of `_feature_state`.

    bfloat16 compute rounds the features x and projection kernels W (each by at most UBF16 relative),
    multiplies them exactly and accumulates in float32 (gamma_32 of sum|x W|), and rounds the
    projections f = x W (UBF16); the loss itself runs in float32.  A relative change e of an input a moves
    the loss by e * a * dL/da, so the bound is UBF16 * sum|a dL/da| over x, W and f, plus gamma_32 times
    sum|dL/df| (|x| |W|), the gradients taken in float32.  (The float32 loss's own rounding, ~1e-5 for
    8 rows at scale 14, is far below.)
    """
    from koclip.model import l2_normalize
    from koclip.train.train import StepOptions, _merge, contrastive_loss

    model = _merge(graphdef, state.params, state.frozen, jnp.float32)
    kernels = (model.visual_projection.kernel[...], model.text_projection.kernel[...])
    feats = (jnp.asarray(batch["image_feats"]), jnp.asarray(batch["text_feats"]))

    def of_projections(fi, ft):
        return contrastive_loss(l2_normalize(fi), l2_normalize(ft), model.logit_scale[...], state.params["loss"],
                                jnp.asarray(batch["valid"]), StepOptions())

    def of_inputs(xi, xt, wi, wt):
        return of_projections(xi @ wi, xt @ wt)

    assert model.visual_projection.bias is None and model.text_projection.bias is None  # nothing else rounded
    inputs = (*feats, *kernels)
    projections = tuple(x @ w for x, w in zip(feats, kernels))
    g_in = jax.grad(of_inputs, argnums=(0, 1, 2, 3))(*inputs)
    g_proj = jax.grad(of_projections, argnums=(0, 1))(*projections)
    moved = sum(float(jnp.abs(a * g).sum()) for a, g in zip(inputs + projections, g_in + g_proj))
    summed = sum(float((jnp.abs(g) * (jnp.abs(x) @ jnp.abs(w))).sum()) for g, x, w in zip(g_proj, feats, kernels))
    return UBF16 * moved + reduction_rtol(32, depth=2) * summed


def test_bfloat16_compute_gives_nearly_the_float32_loss(tiny_model):
    from koclip.train.train import StepOptions, loss_and_grads

    _, _, graphdef, state, batch = _feature_state(tiny_model)

    def run(opts):
        return jax.jit(functools.partial(loss_and_grads, graphdef=graphdef, opts=opts))(state, batch)

    l32, _ = run(StepOptions())
    l16, g16 = run(StepOptions(compute_dtype="bfloat16"))
    assert float(l16) == pytest.approx(float(l32), abs=_bf16_loss_bound(graphdef, state, batch))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # master weights stay float32


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def test_lit_features_are_computed_once_and_reused(tmp_path, data, feature_cache, caplog):
    import logging

    from koclip.train.train import train_and_evaluate

    cfg = tiny_cfg(data, features="both", feature_cache=str(feature_cache), learning_rate=1e-2)
    first = train_and_evaluate(cfg, tmp_path / "a")
    files = sorted(feature_cache.glob("*.npz"))
    # Image features of the train and validation images; one text file, as both sets use the same captions.
    assert sorted(f.name.split("-")[0] for f in files) == ["image", "image", "text"]
    stamps = [f.stat().st_mtime_ns for f in files]
    with caplog.at_level(logging.INFO, logger="koclip.train.features"):
        train_and_evaluate(cfg.replace(max_steps=1), tmp_path / "b")
    assert caplog.text.count("from cache") == 4
    assert [f.stat().st_mtime_ns for f in sorted(feature_cache.glob("*.npz"))] == stamps
    assert math.isfinite(first["final_loss"]) and first["samples_per_s"] > 0


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, feature_cache):
    from koclip.train.train import DivergedError, train_and_evaluate

    cfg = tiny_cfg(data, features="both", feature_cache=str(feature_cache), learning_rate=1e30,
                   warmup_steps=0, checkpoint_every_steps=1, max_grad_norm=0.0)
    with pytest.raises(DivergedError, match=r"Last good checkpoint: step \d+ in .*checkpoints"):
        train_and_evaluate(cfg, tmp_path / "run")
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and not (tmp_path / "run" / "model").exists()


# ---------------------------------------------------------------- two devices


TWO_DEVICES = r"""
import functools, json, sys
import jax, numpy as np
from koclip.config import TINY
from koclip.train import parallel
from koclip.train.config import TrainConfig
from koclip.train.optim import make_optimizer
from koclip.train.train import StepOptions, create_train_state, loss_and_grads, numpy_initialised

cfg = TrainConfig()
graphdef, state = create_train_state(numpy_initialised(TINY, 0), cfg, make_optimizer(cfg, 10))
rng = np.random.default_rng(0)
batch = {"pixel_values": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
         "input_ids": rng.integers(4, 99, (8, 16)).astype(np.int32),
         "attention_mask": (np.arange(16) < rng.integers(3, 17, (8, 1))).astype(np.int32),
         "valid": np.arange(8) != 5}
fn = jax.jit(functools.partial(loss_and_grads, graphdef=graphdef, opts=StepOptions()))

def run(n, min_size=0):
    mesh = parallel.make_mesh(jax.devices()[:n])
    s = jax.device_put(state, parallel.state_shardings(state, mesh, min_size))
    b = parallel.global_batch(batch, mesh)
    loss, grads = fn(s, b)
    split = sum(1 for x in jax.tree.leaves(s.params) if not x.sharding.is_fully_replicated)
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(jax.device_get(grads))], \
        len(b["pixel_values"].addressable_shards), split

one, two, fsdp = run(1), run(2), run(2, min_size=256)
np.savez(sys.argv[1], **{f"{name}_{i}": g for name, r in (("one", one), ("two", two), ("fsdp", fsdp))
                         for i, g in enumerate(r[1])})
print(json.dumps({"devices": jax.device_count(), "loss": [one[0], two[0], fsdp[0]],
                  "batch_shards": [one[2], two[2]], "sharded_params": fsdp[3]}))
"""

# fp32 rounding allowed between one device and two: TINY's longest reduction sums 8 images x 17 tokens
# (a weight gradient over the batch), and a forward plus backward pass through two layers of each tower,
# embeddings, pooling, projection and the loss chains fewer than 40 reductions (tests/numerics.py).
TWO_DEVICE_RTOL = reduction_rtol(8 * 17, depth=40)


@pytest.fixture(scope="module")
def two_devices(run_env, tmp_path_factory):
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    grads_file = tmp_path_factory.mktemp("two_devices") / "grads.npz"
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(grads_file)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with np.load(grads_file) as z:
        for name in ("one", "two", "fsdp"):
            result[f"grads_{name}"] = [z[f"{name}_{i}"] for i in range(sum(k.startswith(name) for k in z))]
    return result


def test_two_devices_give_the_loss_and_gradients_of_one(two_devices):
    assert two_devices["devices"] == 2 and two_devices["batch_shards"] == [1, 2]
    assert two_devices["loss"][1] == pytest.approx(two_devices["loss"][0], rel=TWO_DEVICE_RTOL)
    assert_trees_close(two_devices["grads_one"], two_devices["grads_two"], TWO_DEVICE_RTOL, "gradient")


def test_sharding_large_params_over_devices_changes_nothing(two_devices):
    assert two_devices["sharded_params"] > 0
    assert two_devices["loss"][2] == pytest.approx(two_devices["loss"][0], rel=TWO_DEVICE_RTOL)
    assert_trees_close(two_devices["grads_one"], two_devices["grads_fsdp"], TWO_DEVICE_RTOL, "gradient")


# ---------------------------------------------------------------- whole runs: resume after kill -9


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, run_env):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = subprocess.run(cli_args(data, workdir), env=run_env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def read_metrics(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (koclip.train.writers.MetricWriter), in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _final_weights(workdir):
    from safetensors.numpy import load_file

    return load_file(str(Path(workdir) / "model" / "model.safetensors"))


@pytest.mark.slow  # ~20 s with a warm compilation cache, ~50 s cold on 2 busy cores
def test_kill_9_then_restart_reaches_the_uninterrupted_result(tmp_path, data, run_env, uninterrupted):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cli_args(data, workdir), env=run_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
            assert proc.poll() is None, "the run ended before saving a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (workdir / "summary.json").exists(), "the run finished before it was killed"
    out = subprocess.run(cli_args(data, workdir), env=run_env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((workdir / "summary.json").read_text())
    whole = json.loads((uninterrupted / "summary.json").read_text())
    assert resumed["resumed_from"] > 0 and resumed["steps"] == whole["steps"]
    # Exact, not within a rounding bound: the restart restores parameters, optimiser state, step and data
    # order bit for bit, and on one machine XLA runs the same compiled programs deterministically, so both
    # runs do the same arithmetic in the same order.
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["val_i2t_R@1"] == whole["val_i2t_R@1"]
    a, b = _final_weights(workdir), _final_weights(uninterrupted)
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []


def test_exported_model_loads_with_koclip_load(uninterrupted):
    import koclip

    model, processor = koclip.load(str(uninterrupted / "model"))
    batch = processor(text=["빨간 네모"])
    z = np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))
    assert z.shape == (1, 16)
    # Loading copies the file's float32 values: exact.
    np.testing.assert_array_equal(np.asarray(model.text_projection.kernel[...]),
                                  _final_weights(uninterrupted)["text_projection.kernel"])


def test_run_logs_validation_recall_as_jsonl_and_tensorboard(uninterrupted):
    rows = read_metrics(uninterrupted)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert train_rows and val_rows
    assert {"val_i2t_R@1", "val_i2t_R@5", "val_i2t_R@10", "val_t2i_R@10"} <= val_rows[-1].keys()
    assert {"lr", "grad_norm", "logit_scale"} <= train_rows[-1].keys()
    assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
