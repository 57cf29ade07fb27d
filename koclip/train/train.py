"""Contrastive training of a koclip model.

The pure pieces are top-level functions: `create_train_state` splits a model
into trainable and frozen parts and initialises the optimiser; `train_step`
does one update on a global batch; `eval_step` embeds a batch and scores it.
`train_and_evaluate(config, workdir)` wires them to data, devices,
checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from koclip.config import TINY
from koclip.errors import KoclipError
from koclip.evaluation.datasets import open_dataset
from koclip.evaluation.metrics import retrieval_metrics
from koclip.formats import checkpoints as koclip_checkpoints
from koclip.loading import from_towers, load, processor_for
from koclip.model import KoCLIP
from koclip.processing import Processor
from koclip.tokenizer import load_tokenizer
from koclip.towers.conse import ImageHead, TextHead
from koclip.towers.layers import l2_normalize
from koclip.train import features, parallel, synthetic
from koclip.train.config import TrainConfig
from koclip.train.data import Batches, fixed_length_tokenizer, split_holdout
from koclip.train.losses import blockwise, clip_loss, siglip_loss
from koclip.train.optim import learning_rate_schedule, make_optimizer, path_of, trainable_filter
from koclip.train.writers import MetricWriter

log = logging.getLogger(__name__)

IMAGE_TOWER, TEXT_TOWER = r"vision_model/.*", r"text_model/.*"


class DivergedError(KoclipError):
    """The loss became NaN or infinite."""


class PeerLostError(KoclipError):
    """Another process of a multi-process run stopped (crashed, was killed, or lost its host)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # batches consumed (micro-batches when accumulating)
    params: dict           # {"model": trainable nnx.State, "loss": loss parameters (SigLIP's bias)}
    frozen: Any            # nnx.State of everything else in the model
    opt_state: Any

    def checkpoint_tree(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of the step functions."""

    loss: str = "clip"
    blocks: int = 1                  # >1: negatives only within each of this many row blocks
    compute_dtype: str = "float32"
    max_logit_scale: float = math.log(100.0)

    @classmethod
    def from_config(cls, cfg: TrainConfig, n_devices: int) -> StepOptions:
        return cls(cfg.loss, n_devices if cfg.local_negatives else 1, cfg.compute_dtype, cfg.max_logit_scale)


def locked_towers(cfg: TrainConfig) -> list[str]:
    """Freeze patterns implied by the features mode (a precomputed tower cannot train)."""
    return {"none": [], "image": [IMAGE_TOWER], "text": [TEXT_TOWER], "both": [IMAGE_TOWER, TEXT_TOWER]}[cfg.features]


def create_train_state(model: KoCLIP, cfg: TrainConfig, tx: optax.GradientTransformation):
    """Splits `model` by the freeze patterns and initialises `tx`.

    Returns (graphdef, TrainState).  Frozen parameters get no gradients and no
    optimiser state.
    """
    freeze = list(cfg.freeze) + locked_towers(cfg)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(freeze), ...)
    if not jax.tree.leaves(trainable):
        raise KoclipError(f"the freeze patterns {freeze} leave no parameter to train")
    loss_params = {"logit_bias": jnp.asarray(cfg.siglip_bias_init, jnp.float32)} if cfg.loss == "siglip" else {}
    params = {"model": trainable, "loss": loss_params}
    # jit: one compile for the whole optimiser state rather than one per zeros_like.
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                       opt_state=jax.jit(tx.init)(params))
    return graphdef, state


def _cast(tree, dtype):
    # Scalars (the temperature) stay float32; bf16 would round exp(logit_scale) coarsely.
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x,
                        tree)


def embed(model: KoCLIP, batch: dict, dtype=jnp.float32):
    """L2-normalised (zimg, ztxt) of a batch of pixels/tokens or of precomputed tower features."""
    if "image_feats" in batch:
        zimg = model.project_image(batch["image_feats"].astype(dtype))
    else:
        zimg = model.image_features(batch["pixel_values"].astype(dtype))
    if "text_feats" in batch:
        ztxt = model.text_projection(batch["text_feats"].astype(dtype))
    else:
        ztxt = model.text_features(batch["input_ids"], batch["attention_mask"])
    return l2_normalize(zimg.astype(jnp.float32)), l2_normalize(ztxt.astype(jnp.float32))


def contrastive_loss(zimg, ztxt, logit_scale, loss_params: dict, valid, opts: StepOptions):
    """The configured loss (CLIP or SigLIP, global or block-local negatives) of one batch."""
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    fn, args = (clip_loss, (scale,)) if opts.loss == "clip" else (siglip_loss, (scale, loss_params["logit_bias"]))
    if opts.blocks > 1:
        return blockwise(fn, zimg, ztxt, *args, blocks=opts.blocks, valid=valid)
    return fn(zimg, ztxt, *args, valid=valid)


def _merge(graphdef, params, frozen, dtype):
    return nnx.merge(graphdef, _cast(params["model"], dtype), _cast(frozen, dtype))


def loss_and_grads(state: TrainState, batch: dict, *, graphdef, opts: StepOptions):
    """(loss, grads) of a batch: grads shaped like `state.params`."""
    dtype = jnp.dtype(opts.compute_dtype)

    def loss_fn(params):
        model = _merge(graphdef, params, state.frozen, dtype)
        zimg, ztxt = embed(model, batch, dtype)
        return contrastive_loss(zimg, ztxt, model.logit_scale[...], params["loss"], batch["valid"], opts)

    return jax.value_and_grad(loss_fn)(state.params)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _clamp_logit_scale(params, top: float):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jnp.clip(x, 0.0, top) if path_of(kp) == "model/logit_scale" else x, params)


def train_step(state: TrainState, batch: dict, *, graphdef, tx, opts: StepOptions):
    """One optimiser (micro-)step on a global batch.  Returns (new state, metrics of scalars)."""
    loss, grads = loss_and_grads(state, batch, graphdef=graphdef, opts=opts)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = _clamp_logit_scale(optax.apply_updates(state.params, updates), opts.max_logit_scale)
    model = nnx.merge(graphdef, params["model"], state.frozen)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "logit_scale": jnp.exp(model.logit_scale[...]), "valid_rows": batch["valid"].sum()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, graphdef, opts: StepOptions):
    """Embeds a batch.  Returns (zimg, ztxt, valid, loss over the valid rows)."""
    dtype = jnp.dtype(opts.compute_dtype)
    model = _merge(graphdef, state.params, state.frozen, dtype)
    zimg, ztxt = embed(model, batch, dtype)
    valid = batch["valid"]
    loss = contrastive_loss(zimg, ztxt, model.logit_scale[...], state.params["loss"], valid,
                            dataclasses.replace(opts, blocks=1))
    return zimg, ztxt, valid, loss


to_host = parallel.to_host


def evaluate(eval_fn, state: TrainState, batches, mesh) -> dict[str, float]:
    """Validation loss (mean over examples of per-batch losses) and R@1/5/10 both ways
    over the whole validation set, each image paired with its first caption.

    Identical captions are one gallery entry that is correct for each of their
    images, so datasets whose captions come from class names are scored by class."""
    zi, zt, ok = [], [], []
    total, count = 0.0, 0
    for batch in batches(0):
        z1, z2, valid, loss = to_host(eval_fn(state, parallel.global_batch(batch, mesh)))
        total += float(loss) * int(valid.sum())
        count += int(valid.sum())
        zi.append(z1)
        zt.append(z2)
        ok.append(valid)
    ok = np.concatenate(ok)
    zi, zt = np.concatenate(zi)[ok], np.concatenate(zt)[ok]
    out = {"val_loss": total / max(count, 1), "val_examples": float(count)}
    if count:
        texts = np.array([batches.dataset.captions(int(i))[0] for i in np.flatnonzero(ok)], dtype=object)
        # Repeated captions (class-name datasets) are one gallery entry, correct for all their images.
        uniq, first, codes = np.unique(texts.astype(str), return_index=True, return_inverse=True)
        truth = codes[:, None] == np.arange(len(uniq))[None, :]
        out.update({f"val_{k}": v for k, v in retrieval_metrics(zi @ zt[first].T, truth).items()})
    return out


# ---------------------------------------------------------------- wiring


def numpy_initialised(config, seed: int = 0) -> KoCLIP:
    """A KoCLIP with weights drawn by numpy: normal(0, 0.02) matrices and embeddings,
    zero biases, unit norm scales.

    For test-sized models: jax's initialisers compile one threefry program per
    weight (tens of seconds on a small CPU), numpy takes milliseconds.
    """
    abstract = nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def init(kp, x):
        leaf = path_of(kp).rsplit("/", 1)[-1]
        if leaf == "logit_scale":
            return jnp.asarray(config.logit_scale_init, x.dtype)
        if leaf in ("scale", "var"):
            return jnp.ones(x.shape, x.dtype)
        if leaf in ("bias", "mean"):
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, shapes))


def _tokenizer(name: str):
    """A tokenizer folder (tokenizer.json + tokenizer_config.json) or a hub id."""
    return load_tokenizer(name, Path(name))


def build_model(cfg: TrainConfig):
    """The model and processor named by the config (see TrainConfig.model)."""
    if cfg.model == "tiny":
        if not cfg.tokenizer:
            raise KoclipError("model='tiny' needs tokenizer= a folder with tokenizer.json")
        model = numpy_initialised(TINY, cfg.seed)
        processor = Processor.for_config(TINY, _tokenizer(cfg.tokenizer))
    elif cfg.model == "towers":
        model = from_towers(cfg.text_tower, cfg.vision_tower, projection_dim=cfg.projection_dim, seed=cfg.seed)
        processor = processor_for(model)
    else:
        model, processor = load(cfg.model)
        if cfg.tokenizer:
            processor.tokenizer = _tokenizer(cfg.tokenizer)
    if cfg.tokenizer:
        model.config = model.config.replace(tokenizer=cfg.tokenizer)
    if cfg.reinit_heads:
        reinit_heads(model, cfg.seed)
    return model, processor


def reinit_heads(model: KoCLIP, seed: int = 0) -> None:
    """Starts both projection heads and the temperature afresh, for fitting the heads of a model
    whose towers are kept (TrainConfig.reinit_heads).  Every head parameter is reset, for either
    head kind (linear, affine or conse):

    - matrices (the kernels, and a ConSE image head's class embeddings) are drawn from
      normal(0, 0.02), seeded by `seed`, as KoCLIP initialises its linear heads' kernels;
    - every other parameter takes the value a newly built head holds: zero biases, and for ConSE
      zero means, temperature 1 and blend 0.5;
    - logit_scale returns to config.logit_scale_init.

    A ConSE head is not simply rebuilt: its constructor's matrices (identity, zeros) are placeholders
    for fitted values, and an image head of zeros maps every image to the zero vector, whose L2
    normalisation has NaN gradients, so training could not start from it.
    """
    rng = np.random.default_rng([seed, 17])
    for head in (model.text_projection, model.visual_projection):
        built = _built_head_values(head)
        for name, param in sorted(vars(head).items()):
            if not isinstance(param, nnx.Param):
                continue
            shape = param[...].shape
            if len(shape) == 2:
                param[...] = jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32)
            else:
                param[...] = jnp.broadcast_to(jnp.asarray(built[name], jnp.float32), shape)
    model.logit_scale[...] = jnp.asarray(model.config.logit_scale_init, jnp.float32)


def _built_head_values(head) -> dict:
    """Parameter name -> its value in a newly built head of `head`'s kind and sizes, for the
    parameters that are not matrices."""
    if isinstance(head, nnx.Linear):
        return {"bias": 0.0}  # nnx.Linear's bias_init, which KoCLIP keeps
    if isinstance(head, TextHead):
        new = TextHead(head.mean.shape[0])
    elif isinstance(head, ImageHead):
        (features, dim), classes = head.kernel.shape, head.class_embeddings.shape[0]
        new = ImageHead(features, classes, dim, head.top_k)
    else:
        raise KoclipError(f"reinit_heads: unknown head {type(head).__name__}; valid: nnx.Linear, "
                          "koclip.towers.conse.TextHead and ImageHead")
    return {name: p[...] for name, p in vars(new).items() if isinstance(p, nnx.Param)}


def load_datasets(cfg: TrainConfig):
    """(train, validation or None) datasets; see TrainConfig's data fields."""
    if not cfg.train_data:
        raise KoclipError("train_data is empty; give a caption file, an IDX folder, class folders or "
                          "'fashion-mnist' (or synthetic_examples > 0 for generated data)")
    kw = dict(classnames=cfg.classnames or None, templates=cfg.templates, image_root=cfg.image_root or None)
    train = open_dataset(cfg.train_data, split=cfg.train_split, **kw)
    val = None
    if cfg.val_data:
        val = open_dataset(cfg.val_data, split=cfg.val_split, **kw)
    elif cfg.val_size:
        tr, va = split_holdout(len(train), cfg.val_size, cfg.seed)
        train, val = train.take(tr), train.take(va)
    if cfg.max_train_examples and cfg.max_train_examples < len(train):
        pick = np.random.default_rng([cfg.seed, 998]).permutation(len(train))[:cfg.max_train_examples]
        train = train.take(np.sort(pick))
    return train, val


def make_batches(cfg, model, processor, dataset, batch_size, *, train, mesh, cache_dir, progress):
    """A `Batches` for `dataset`, with cached tower features in LiT mode."""
    length = cfg.max_length or model.config.max_length
    tokenize = fixed_length_tokenizer(processor.tokenizer, length, processor.text_prefix)
    kw: dict = {}
    if cfg.features in ("image", "both"):
        kw["image_feats"], kw["image_ok"], _ = features.image_features(
            model, dataset, processor.image_spec, cache_dir, mesh=mesh, batch_size=_eval_batch(cfg, mesh),
            num_workers=cfg.num_workers, progress=progress)
    else:
        kw["image_spec"] = processor.image_spec
    if cfg.features in ("text", "both"):
        texts, kw["caption_rows"] = features.caption_table(dataset)
        tok_id = f"{model.config.tokenizer}|{length}|{processor.text_prefix}"
        kw["text_feats"], _ = features.text_features(model, texts, tokenize, tok_id, cache_dir, mesh=mesh,
                                                     batch_size=_eval_batch(cfg, mesh), progress=progress)
    else:
        kw["tokenize"] = tokenize
    return Batches(dataset, batch_size, seed=cfg.seed, train=train, num_workers=cfg.num_workers,
                   prefetch=cfg.prefetch_batches, process_index=jax.process_index(),
                   process_count=jax.process_count(), **kw)


def _eval_batch(cfg, mesh) -> int:
    n = mesh.shape[parallel.AXIS]
    return -(-cfg.eval_batch_size // n) * n


def _resolve_synthetic(cfg: TrainConfig, workdir: Path) -> TrainConfig:
    if not cfg.synthetic_examples or cfg.train_data:
        return cfg
    paths = synthetic.make(workdir / "data", cfg.synthetic_examples, seed=cfg.seed)
    return cfg.replace(train_data=str(paths["train"]), val_data=str(paths["val"]),
                       tokenizer=cfg.tokenizer or str(paths["tokenizer"]))


def _check_compatible(meta: dict, expect: dict, directory) -> None:
    diff = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise KoclipError(f"{directory}: the checkpoint was written by a run with other settings ({shown}); "
                          "use a new --workdir or the original settings")


@dataclasses.dataclass
class Progress:
    """How far a run got: `train_loop` and `restore_latest` update it; the summary and the
    message when a peer process is lost read it."""

    directory: Path | None = None    # where the checkpoints go
    step: int | None = None          # the last step whose loss was read
    loss: float = math.nan           # that step's loss
    saved: int | None = None         # the last checkpoint's step: the last good one
    val_metrics: dict = dataclasses.field(default_factory=dict)  # of the last evaluation
    train_seconds: float = 0.0       # in train steps after the first (which compiles), pauses excluded
    timed_steps: int = 0             # the steps that train_seconds covers

    def lost_peer_message(self, error: BaseException) -> str:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        where = ("before its first step" if self.step is None else f"after step {self.step}")
        resume = (f"restart all processes to resume from the last checkpoint (step {self.saved} in "
                  f"{self.directory} on process 0's host)" if self.saved is not None
                  else "no checkpoint was saved yet: restarting all processes starts from step 0")
        return f"{parallel.peer_description()} stopped responding ({detail}); the run stopped {where}; {resume}"


@contextlib.contextmanager
def raising_peer_lost(at: Progress):
    """Turns the runtime error of a collective whose peer process is gone into a PeerLostError
    that says, from `at`, where the run stopped and where it can resume."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not parallel.lost_peer(e):
            raise
        raise PeerLostError(at.lost_peer_message(e)) from e


def prepare_workdir(cfg: TrainConfig, workdir) -> tuple[TrainConfig, Path]:
    """Makes WORKDIR, generates the synthetic data `cfg` asks for and writes WORKDIR/config.json
    (process 0).  Returns (the config with that data's paths, WORKDIR resolved)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = _resolve_synthetic(cfg, workdir)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
    return cfg, workdir


def count_read_skips(train_ds, val_ds) -> int:
    """The rows that reading the datasets skipped as unusable (logged when there are any)."""
    skips = sum(train_ds.skipped.values()) + (sum(val_ds.skipped.values()) if val_ds is not None else 0)
    if skips:
        log.warning("skipped %d unusable rows while reading (train %s, val %s)", skips,
                    dict(train_ds.skipped), dict(val_ds.skipped) if val_ds is not None else {})
    return skips


def make_run_batches(cfg, model, processor, train_ds, val_ds, *, mesh, workdir: Path, progress: bool):
    """(training `Batches` of the global batch size, validation `Batches` or None when there is no
    validation data), their tower features cached under cfg.feature_cache or WORKDIR/features."""
    global_batch = cfg.batch_size_per_device * mesh.shape[parallel.AXIS]
    cache_dir = Path(cfg.feature_cache) if cfg.feature_cache else workdir / "features"
    kw = dict(mesh=mesh, cache_dir=cache_dir, progress=progress)
    train = make_batches(cfg, model, processor, train_ds, global_batch, train=True, **kw)
    val = (make_batches(cfg, model, processor, val_ds, _eval_batch(cfg, mesh), train=False, **kw)
           if val_ds is not None and len(val_ds) else None)
    return train, val


def count_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's (micro-)steps: num_epochs epochs, at most max_steps when that is set."""
    total = cfg.num_epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def compile_steps(graphdef, tx, opts: StepOptions, shardings, mesh):
    """(train_fn, eval_fn): `train_step` and `eval_step` jitted for a state laid out as `shardings`.
    train_fn donates its input state."""
    train_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, opts=opts),
                       out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, opts=opts))
    return train_fn, eval_fn


def restore_latest(ckpt, state: TrainState, expect: dict, at: Progress, steps_per_epoch: int):
    """Returns (state, its step): the newest checkpoint's (process 0's, on every process), else
    `state` at step 0.  Raises KoclipError if the checkpoint's metadata differs from `expect`."""
    if ckpt.latest_step() is None:
        return state, 0
    tree, meta = ckpt.restore(state.checkpoint_tree())
    _check_compatible(meta, expect, ckpt.directory)
    start = at.saved = at.step = int(tree["step"])
    log.info("resumed from step %d (epoch %d) in %s", start, start // steps_per_epoch, ckpt.directory)
    return state.replace(**tree), start


def check_loss(pending, at: Progress, *, steps_per_epoch: int, learning_rate: float) -> None:
    """Reads the loss of `pending` = (step, metrics) into `at`, which waits for that step to finish.
    Raises DivergedError if it is NaN or infinite.  `pending` None: nothing to read."""
    if pending is None:
        return
    s, m = pending
    loss = float(m["loss"])
    if not math.isfinite(loss):
        where = (f"step {at.saved} in {at.directory}" if at.saved is not None
                 else "none (no checkpoint was saved yet)")
        raise DivergedError(f"loss became {loss} at step {s} (epoch {(s - 1) // steps_per_epoch}); training "
                            f"stopped. Last good checkpoint: {where}. Lower learning_rate (now {learning_rate:g}) "
                            "or raise warmup_steps, then run again to resume.")
    at.loss, at.step = loss, s


def save_checkpoint(ckpt, state: TrainState, step: int, meta: dict, at: Progress) -> None:
    """Saves `state` as checkpoint `step` with `meta` and records it in `at`; refuses with a
    DivergedError when a parameter is NaN or infinite."""
    if not bool(_all_finite(state.params)):
        raise DivergedError(f"parameters hold NaN or inf after step {step}; training stopped without saving. "
                            f"Last good checkpoint: step {at.saved} in {ckpt.directory}.")
    ckpt.save(step, state.checkpoint_tree(), meta)
    at.saved = step


def evaluate_and_log(eval_fn, state: TrainState, val_batches, mesh, writer, step: int,
                     steps_per_epoch: int) -> dict[str, float]:
    """`evaluate`, with its metrics written as `step`'s and logged."""
    t = time.perf_counter()
    metrics = evaluate(eval_fn, state, val_batches, mesh)
    writer.write(step, {**metrics, "epoch": step / steps_per_epoch})
    log.info("step %d: %s (%.1f s)", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
             time.perf_counter() - t)
    return metrics


def train_loop(state: TrainState, start: int, total: int, *, cfg: TrainConfig, train_fn, eval_fn,
               train_batches, val_batches, mesh, ckpt, writer, bar, schedule, expect: dict,
               at: Progress) -> tuple[TrainState, int]:
    """Runs steps start + 1 .. total; logs, checkpoints and evaluates every so many steps (as `cfg`
    says) and after the last.  Returns (state, the step reached); `at` holds the last loss,
    checkpoint and evaluation, and the time spent training."""
    spe = train_batches.steps_per_epoch
    check = functools.partial(check_loss, at=at, steps_per_epoch=spe, learning_rate=cfg.learning_rate)
    step, pending, timed_from = start, None, start
    while step < total:
        epoch, pos = divmod(step, spe)
        t_mark = time.perf_counter()
        for batch in train_batches(epoch, pos):
            state, metrics = train_fn(state, parallel.global_batch(batch, mesh))
            step += 1
            # Reading a loss waits for its step; checking one step behind keeps the device busy.
            check(pending)
            pending = (step, metrics)
            bar.update(1)
            if step == start + 1:  # the first step compiles: time from the end of it
                check(pending)
                pending, t_mark = None, time.perf_counter()
                timed_from = step
            last, epoch_end = step == total, step % spe == 0
            log_now = last or step % cfg.log_every_steps == 0
            save_now = last or step % cfg.checkpoint_every_steps == 0
            eval_now = last or (step % cfg.eval_every_steps == 0 if cfg.eval_every_steps else epoch_end)
            if not (log_now or save_now or eval_now or epoch_end):
                continue
            check(pending)
            pending = None
            if step > timed_from:  # time spent training since the last pause, excluding the pauses
                at.train_seconds += time.perf_counter() - t_mark
                at.timed_steps += step - timed_from
            if log_now:
                lr = float(schedule(max(0, step - 1) // cfg.grad_accum_steps))
                m = {k: float(v) for k, v in metrics.items()}
                writer.write(step, {**m, "lr": lr, "epoch": step / spe, "bad_images": len(train_batches.bad_images)})
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            if save_now:
                save_checkpoint(ckpt, state, step, {**expect, "step": step, "epoch": step // spe,
                                                    "bad_images": len(train_batches.bad_images)}, at)
            if eval_now and val_batches is not None:
                at.val_metrics = evaluate_and_log(eval_fn, state, val_batches, mesh, writer, step, spe)
            if epoch_end and train_batches.bad_images:
                log.warning("epoch %d: %d undecodable images skipped so far", epoch, len(train_batches.bad_images))
            t_mark, timed_from = time.perf_counter(), step
            if step >= total:
                break
    check(pending)
    return state, step


def export_model(graphdef, state: TrainState, processor, export_dir: Path) -> None:
    """Writes the trained model in koclip's format to `export_dir`, with the processor's tokenizer
    where it can be saved."""
    model = nnx.merge(graphdef, to_host(state.params["model"]), to_host(state.frozen))
    koclip_checkpoints.save(model, export_dir)
    try:
        processor.tokenizer.save_pretrained(str(export_dir))
    except (AttributeError, NotImplementedError, OSError, TypeError, ValueError) as e:
        log.warning("the tokenizer was not saved with the model (%s); loading will use %r", e,
                    model.config.tokenizer)


def count_bad_rows(cfg: TrainConfig, read_skips: int, train_batches, val_batches) -> int:
    """Rows skipped in reading, undecodable images, and (LiT) images whose features failed."""
    bad = read_skips + len(train_batches.bad_images) + (len(val_batches.bad_images) if val_batches else 0)
    if cfg.features in ("image", "both"):
        bad += int((~train_batches.image_ok).sum())
    return bad


def train_and_evaluate(cfg: TrainConfig, workdir, *, model: KoCLIP | None = None, processor=None) -> dict:
    """Trains per `cfg`, resuming from WORKDIR/checkpoints if any; returns a summary dict.

    `model` and `processor`: a model built in Python to train instead of the one
    `cfg.model` names (a resumed run must pass the same one again).
    Writes WORKDIR/metrics.jsonl, WORKDIR/tb/ (TensorBoard), WORKDIR/checkpoints/
    (orbax), WORKDIR/summary.json and the final model in koclip's format
    (WORKDIR/model unless `export_dir`).

    Several processes (see koclip.train.parallel): each passes its own WORKDIR (the
    hosts need not share a disk); only process 0 writes the files above and the
    feature cache, and a resumed run restores process 0's checkpoint everywhere.
    When another process stops, raises PeerLostError, saying after which step and
    from which checkpoint to resume.  The process should then exit at once
    (`os._exit`, as `koclip train` does): JAX's shutdown waits at a barrier for
    every process, which a dead one never reaches, until its heartbeat timeout
    (100 s) aborts the process.
    """
    # orbax and tensorstore take a second or more to import; only a run needs them.
    from koclip.train.checkpointing import Checkpointer

    parallel.maybe_initialize_distributed()
    at = Progress()
    with raising_peer_lost(at):
        t_start = time.perf_counter()
        cfg, workdir = prepare_workdir(cfg, workdir)
        lead = jax.process_index() == 0
        mesh = parallel.make_mesh()
        n_dev = mesh.shape[parallel.AXIS]
        global_batch = cfg.batch_size_per_device * n_dev
        log.info("%d device(s) (%s), %d process(es), global batch %d", n_dev, jax.devices()[0].platform,
                 jax.process_count(), global_batch)
        if model is None:
            model, processor = build_model(cfg)
        elif processor is None:
            raise KoclipError("train_and_evaluate(model=...) needs its processor too")
        train_ds, val_ds = load_datasets(cfg)
        read_skips = count_read_skips(train_ds, val_ds)
        train_batches, val_batches = make_run_batches(cfg, model, processor, train_ds, val_ds, mesh=mesh,
                                                      workdir=workdir, progress=cfg.progress and lead)
        spe = train_batches.steps_per_epoch
        total = count_steps(cfg, spe)
        updates = max(1, total // cfg.grad_accum_steps)
        tx, schedule = make_optimizer(cfg, updates), learning_rate_schedule(cfg, updates)
        graphdef, state = create_train_state(model, cfg, tx)
        del model
        shardings = parallel.state_shardings(state, mesh, cfg.shard_params_min_size)
        state = jax.device_put(state, shardings)
        train_fn, eval_fn = compile_steps(graphdef, tx, StepOptions.from_config(cfg, n_dev), shardings, mesh)
        log.info("%d examples, %d steps per epoch, %d steps; %.2fM trainable, %.2fM frozen parameters",
                 len(train_ds), spe, total, _size(state.params) / 1e6, _size(state.frozen) / 1e6)

        ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
        at.directory = ckpt.directory
        expect = {"seed": cfg.seed, "global_batch": global_batch, "steps_per_epoch": spe,
                  "train_data": cfg.train_data, "features": cfg.features}
        state, start = restore_latest(ckpt, state, expect, at, spe)
        writer = MetricWriter(workdir, enabled=lead)
        bar = tqdm(total=total, initial=start, desc="train", disable=not (cfg.progress and lead), unit="step")
        try:
            state, step = train_loop(state, start, total, cfg=cfg, train_fn=train_fn, eval_fn=eval_fn,
                                     train_batches=train_batches, val_batches=val_batches, mesh=mesh, ckpt=ckpt,
                                     writer=writer, bar=bar, schedule=schedule, expect=expect, at=at)
        finally:
            bar.close()
            ckpt.close()
            writer.close()

        export_dir = Path(cfg.export_dir) if cfg.export_dir else workdir / "model"
        if lead:
            export_model(graphdef, state, processor, export_dir)
        summary = {
            "steps": step, "resumed_from": start, "epochs": step / spe,
            "final_loss": at.loss if math.isfinite(at.loss) else None,  # None: no step ran in this call
            "samples_per_s": at.timed_steps * global_batch / at.train_seconds if at.train_seconds else None,
            "train_seconds": at.train_seconds, "wall_seconds": time.perf_counter() - t_start,
            "global_batch": global_batch, "devices": n_dev,
            "bad_rows": count_bad_rows(cfg, read_skips, train_batches, val_batches),
            "export_dir": str(export_dir), **at.val_metrics,
        }
        if lead:
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
