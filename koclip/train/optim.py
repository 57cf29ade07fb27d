"""The optimiser: AdamW with warmup and decay, decay masked by path, clipping, accumulation.

Parameters are addressed by their '/'-joined path in the model
(`text_model/encoder/layer/0/attention/self/query/kernel`, `logit_scale`);
freezing and weight-decay exclusion are regexes over those paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax
from flax import nnx

from koclip.train.config import TrainConfig


def _key_name(k) -> str | None:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_of(keypath) -> str:
    """A jax key path (or an nnx path tuple) -> 'a/b/c'; nnx's trailing `.value` is dropped."""
    names = [_key_name(k) if not isinstance(k, (str, int)) else str(k) for k in keypath]
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"freeze pattern {p!r} is not a valid regex ({e})") from None
    return out


def trainable_filter(freeze: Sequence[str]):
    """An nnx filter: Params whose path matches none of the `freeze` regexes (full match)."""
    pats = _compile(freeze)

    def keep(path, value) -> bool:
        s = "/".join(map(str, path))
        return not any(p.fullmatch(s) for p in pats)

    return nnx.All(nnx.Param, keep)


def decay_mask(params, no_decay: str):
    """A pytree of bools shaped like `params`: True where weight decay applies."""
    pat = re.compile(no_decay)
    return jax.tree_util.tree_map_with_path(lambda kp, _: not pat.fullmatch(path_of(kp)), params)


def learning_rate_schedule(cfg: TrainConfig, total_updates: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps` updates, then
    cosine / linear decay to `end_learning_rate` at `total_updates` (or constant)."""
    warm = max(0, min(cfg.warmup_steps, total_updates))
    rest = max(1, total_updates - warm)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, rest,
                                            alpha=cfg.end_learning_rate / cfg.learning_rate
                                            if cfg.learning_rate else 0.0)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, cfg.end_learning_rate, rest)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), decay], [warm])


def make_optimizer(cfg: TrainConfig, total_updates: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; wrapped in MultiSteps when accumulating gradients.

    `total_updates` counts optimiser updates (batches / grad_accum_steps).
    """
    schedule = learning_rate_schedule(cfg, total_updates)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=lambda p: decay_mask(p, cfg.no_decay)),
    )
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx
