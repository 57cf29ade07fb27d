"""Tower modules: one file per architecture, each with `Model(config, *, rngs)`.

Text towers return (hidden, pooled) from `(input_ids, attention_mask)`; image
towers return (hidden, pooled) from NHWC `pixel_values`.
"""

from __future__ import annotations

import importlib

from flax import nnx

from koclip.config import TextConfig, VisionConfig, efficientnet_variant

_MODULES = {
    "bert": "koclip.towers.bert",
    "roberta": "koclip.towers.bert",
    "clip": "koclip.towers.clip_vision",
    "clip_text": "koclip.towers.clip_text",
    "vit": "koclip.towers.vit",
    "efficientnet": "koclip.towers.efficientnet",
    "siglip": "koclip.towers.siglip",
}


def module(kind: str):
    try:
        return importlib.import_module(_MODULES[kind])
    except KeyError:
        raise ValueError(f"unknown tower kind {kind!r}; valid: {', '.join(_MODULES)}") from None


def build(cfg: TextConfig | VisionConfig, rngs: nnx.Rngs) -> nnx.Module:
    kind = cfg.kind
    if isinstance(cfg, TextConfig) and f"{kind}_text" in _MODULES:  # a text kind named like an image kind
        kind = f"{kind}_text"
    m = module(kind)
    if cfg.kind == "efficientnet":
        return m.Model(efficientnet_variant(cfg.variant), rngs=rngs)
    return m.Model(cfg, rngs=rngs)
