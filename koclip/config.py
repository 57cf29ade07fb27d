"""Model sizes as data.

A koclip model is described by a `ModelConfig`: a text tower, an image tower,
the projection size and how inputs are prepared.  The configs read and write the
`config.json` layouts used by the published checkpoints (transformers'
`hybrid-clip` and `vision-text-dual-encoder` model types), so a checkpoint's
own config decides the architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from koclip.errors import ConfigError

TEXT_KINDS = ("bert", "roberta", "clip", "siglip")
VISION_KINDS = ("clip", "vit", "efficientnet", "siglip")


# ---------------------------------------------------------------- EfficientNet-Lite sizes

@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: `repeats` MBConv blocks; only the first has `stride`."""

    repeats: int
    kernel: int
    stride: int
    expand: int  # width of the depthwise conv = expand * input width
    features: int  # output width


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """Sizes of an EfficientNet-Lite; see `EFFICIENTNET_LITE0` and `EFFICIENTNET_TINY`."""

    stages: tuple[Stage, ...]
    stem_features: int = 32
    head_features: int = 1280
    num_classes: int = 1000
    image_size: int = 224
    bn_epsilon: float = 1e-3

    def blocks(self) -> list[tuple[int, int, int, int, int]]:
        """Per block (in_features, out_features, kernel, stride, expand), in order."""
        out = []
        width = self.stem_features
        for s in self.stages:
            for r in range(s.repeats):
                out.append((width, s.features, s.kernel, s.stride if r == 0 else 1, s.expand))
                width = s.features
        return out


EFFICIENTNET_LITE0 = EfficientNetConfig(
    stages=(
        Stage(1, 3, 1, 1, 16),
        Stage(2, 3, 2, 6, 24),
        Stage(2, 5, 2, 6, 40),
        Stage(3, 3, 2, 6, 80),
        Stage(3, 5, 1, 6, 112),
        Stage(4, 5, 2, 6, 192),
        Stage(1, 3, 1, 6, 320),
    )
)

# For tests: the code paths of EFFICIENTNET_LITE0 (block without expansion, expansion with
# stride 2 and kernel 5, residual after expansion) at a tiny size.
EFFICIENTNET_TINY = EfficientNetConfig(
    stages=(Stage(1, 3, 1, 1, 16), Stage(2, 5, 2, 3, 24)),
    stem_features=8,
    head_features=160,
    num_classes=10,
    image_size=32,
)

EFFICIENTNET_VARIANTS = {"lite0": EFFICIENTNET_LITE0, "tiny": EFFICIENTNET_TINY}


def efficientnet_variant(variant: str) -> EfficientNetConfig:
    """Variant name ("lite0", "tiny") -> its config."""
    try:
        return EFFICIENTNET_VARIANTS[variant]
    except KeyError:
        raise ConfigError(
            f"unknown EfficientNet variant {variant!r}; valid: {', '.join(EFFICIENTNET_VARIANTS)}"
        ) from None


@dataclass(frozen=True)
class TextConfig:
    """A text encoder: BERT-family (BERT, RoBERTa, XLM-R style), CLIP's causal transformer ("clip"), or
    SigLIP's ("siglip": pools the last position through its own head to `projection_size`; `pooling`,
    `positions` and `type_vocab_size` do not apply to it)."""

    kind: str = "roberta"
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_act: str = "gelu"
    # "pooler": dense + tanh on the first token (what KoCLIP used);
    # "mean": mean over non-padding tokens; "cls": the first token's state;
    # "eos": the end-of-text token's state (CLIP's, the only pooling of kind "clip").  "" picks by kind.
    pooling: str = ""
    # Token positions: "padding" counts from pad_token_id + 1 over non-padding tokens (RoBERTa),
    # "arange" numbers 0..L-1 (BERT, CLIP).  "" picks by kind.
    positions: str = ""
    # siglip: the width of the text head (transformers' SiglipTextConfig.projection_size); 0 = hidden_size.
    projection_size: int = 0
    # CLIP: the end-of-text token id whose first position is pooled.  2, which configs written before
    # transformers' PR #24773 hold, pools at the highest token id instead, as transformers does.
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ConfigError(f"unknown text tower kind {self.kind!r}; valid: {', '.join(TEXT_KINDS)}")
        if not self.pooling:
            object.__setattr__(self, "pooling", "eos" if self.kind == "clip" else "pooler")
        valid = ("eos",) if self.kind == "clip" else ("pooler", "mean", "cls")
        if self.pooling not in valid:
            raise ConfigError(f"unknown {self.kind} text pooling {self.pooling!r}; valid: {', '.join(valid)}")
        if not self.positions:
            object.__setattr__(self, "positions", "padding" if self.kind == "roberta" else "arange")
        if self.kind == "siglip" and not self.projection_size:
            object.__setattr__(self, "projection_size", self.hidden_size)
        if self.positions not in ("padding", "arange"):
            raise ConfigError(f"unknown text positions {self.positions!r}; valid: padding, arange")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")

    @property
    def output_dim(self) -> int:
        return self.projection_size if self.kind == "siglip" else self.hidden_size

    @classmethod
    def from_hf(cls, d: dict) -> TextConfig:
        """Reads a transformers `BertConfig`/`RobertaConfig`/`XLMRobertaConfig`/`CLIPTextConfig`/
        `SiglipTextConfig` dict (or a `CLIPConfig`'s text part)."""
        model_type = d.get("model_type", "bert")
        if model_type in ("clip", "clip_text_model"):
            return cls._from_clip(clip_section(d, "text") if model_type == "clip" else d)
        if model_type == "siglip_text_model":  # transformers' SiglipTextConfig defaults for absent keys
            kw = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=64, layer_norm_eps=1e-6, pad_token_id=1,
                      hidden_act="gelu_pytorch_tanh")
            kw = {k: d[k] if d.get(k) is not None else v for k, v in kw.items()}
            return cls(kind="siglip", type_vocab_size=1, projection_size=d.get("projection_size") or 0, **kw)
        kind = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}.get(model_type)
        if kind is None:
            raise ConfigError(f"text model_type {model_type!r} is not supported; "
                              "valid: bert, roberta, xlm-roberta, clip, clip_text_model, siglip_text_model")
        return cls(
            kind=kind,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            pad_token_id=d.get("pad_token_id", 0 if kind == "bert" else 1),
            hidden_act=d.get("hidden_act", "gelu"),
            pooling=d.get("koclip_pooling", "pooler"),
            positions=d.get("koclip_positions", ""),
        )

    @classmethod
    def _from_clip(cls, d: dict) -> TextConfig:
        """A `CLIPTextConfig` dict; keys it leaves out take transformers' defaults."""
        eos = d.get("eos_token_id", 49407)
        if type(eos) is not int:
            raise ConfigError(f"CLIP text eos_token_id is {eos!r}, expected one integer")
        kw = dict(vocab_size=49408, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=77, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu", pad_token_id=1)
        return cls(kind="clip", type_vocab_size=1, eos_token_id=eos,
                   **{k: (v if d.get(k) is None else d[k]) for k, v in kw.items()})

    def to_hf(self) -> dict:
        if self.kind == "siglip":
            keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "layer_norm_eps", "pad_token_id", "hidden_act")
            return {"model_type": "siglip_text_model", **{k: getattr(self, k) for k in keys},
                    "projection_size": self.output_dim}
        if self.kind == "clip":
            return {"model_type": "clip_text_model", "eos_token_id": self.eos_token_id,
                    **{k: getattr(self, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "intermediate_size",
                                                     "max_position_embeddings", "layer_norm_eps", "hidden_act",
                                                     "pad_token_id")}}
        return {
            "model_type": self.kind,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "hidden_act": self.hidden_act,
            "koclip_pooling": self.pooling,
            "koclip_positions": self.positions,
        }


def clip_section(d: dict, side: str) -> dict:
    """The `side` ("text" or "vision") part of a CLIPConfig dict, as transformers reads it: an old
    config's `{side}_config_dict`, where present, replaces `{side}_config` (every key the section
    defines, absent ones at their defaults)."""
    legacy = d.get(f"{side}_config_dict")
    return legacy if isinstance(legacy, dict) else d.get(f"{side}_config") or {}


@dataclass(frozen=True)
class VisionConfig:
    """An image encoder: CLIP's ViT, Google's ViT, or a CNN named by `variant`."""

    kind: str = "clip"
    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    variant: str = ""  # for CNN towers, e.g. "lite0"

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ConfigError(
                f"unknown vision tower kind {self.kind!r}; valid: {', '.join(VISION_KINDS)}")
        if self.kind == "efficientnet":
            efficientnet_variant(self.variant)  # an unknown variant fails here, not when the model is built
        elif self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def output_dim(self) -> int:
        if self.kind == "efficientnet":
            return efficientnet_variant(self.variant).head_features
        return self.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> VisionConfig:
        """Reads a transformers `CLIPVisionConfig`/`CLIPConfig`/`ViTConfig`/`SiglipVisionConfig` dict."""
        model_type = d.get("model_type")
        if model_type == "siglip_vision_model" and d.get("vision_use_head", True) is not True:
            raise ConfigError("a SigLIP vision tower without its attention-pooling head (vision_use_head "
                              f"{d['vision_use_head']!r}) has no image embedding to give")
        if model_type == "clip":  # a full CLIPConfig: take its vision part
            d = {**clip_section(d, "vision"), "model_type": "clip_vision_model"}
            model_type = "clip_vision_model"
        # transformers' defaults for keys a config.json may leave out, per model type.
        defaults = {
            "clip_vision_model": dict(kind="clip", patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
            "vit": dict(kind="vit", patch_size=16, layer_norm_eps=1e-12, hidden_act="gelu"),
            "siglip_vision_model": dict(kind="siglip", patch_size=16, layer_norm_eps=1e-6,
                                        hidden_act="gelu_pytorch_tanh"),
        }
        if model_type in defaults:
            kw = dict(image_size=224, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, num_channels=3, **defaults[model_type])
            return cls(**{k: (v if k == "kind" else d.get(k, v)) for k, v in kw.items()})
        if model_type == "efficientnet":
            return cls(kind="efficientnet", image_size=d.get("image_size", 224), patch_size=1,
                       variant=d.get("variant", "lite0"))
        raise ConfigError(
            f"vision model_type {model_type!r} is not supported; "
            "valid: clip_vision_model, clip, vit, siglip_vision_model, efficientnet")

    def to_hf(self) -> dict:
        if self.kind == "efficientnet":
            return {"model_type": "efficientnet", "image_size": self.image_size, "variant": self.variant}
        return {
            "model_type": {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(self.kind, "vit"),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "num_channels": self.num_channels,
        }


@dataclass(frozen=True)
class ModelConfig:
    """A two-tower model and how its inputs are prepared."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    # "linear": bias-free projections (CLIP, KoCLIP).  "affine": projections
    # with a bias, for heads fitted on centred features.  "conse": koclip-mini's
    # blend of a ridge map and ConSE over the CNN's classes (koclip.mini.heads);
    # its joint space is twice the text width.
    head: str = "linear"
    # Per-tower overrides of `head` ("" = as `head`): "linear", "affine", or "none" (the tower's pooled
    # output is already in the joint space: SigLIP's towers end in their own heads).  M-CLIP pairs an
    # affine text map with CLIP's bias-free visual projection.
    text_head: str = ""
    vision_head: str = ""
    # How a model scores an image against a text: "softmax" (CLIP: exp(logit_scale) * cosine, a
    # softmax over the texts) or "sigmoid" (SigLIP: exp(logit_scale) * cosine + logit_bias, each pair
    # an independent probability).
    scoring: str = "softmax"
    logit_bias_init: float = 0.0
    # For head "conse": how many of the CNN's top classes make an image embedding.
    conse_top_k: int = 10
    # Name of a preprocessing preset in koclip.images.PRESETS.
    preprocess: str = "clip"
    # Tokenizer: a hub id or a local path understood by transformers'
    # AutoTokenizer, or "e5" for the tokenizer bundled with the mini model.
    tokenizer: str = "klue/roberta-large"
    max_length: int = 96
    text_prefix: str = ""
    # How Processor pads token ids: "bucket" (to the smallest of koclip.buckets.LENGTH_BUCKETS that fits the
    # longest text) or "max_length" (every text to exactly max_length, as SigLIP was trained).
    text_padding: str = "bucket"
    # False: the attention mask Processor gives is all ones, padding included (SigLIP's tokenizers return
    # no mask, so its towers always saw their padding); True: padding is masked out.
    text_mask_padding: bool = True
    # Lowercase texts before tokenizing (SigLIP 2 was trained on lowercased text).
    text_lowercase: bool = False

    def __post_init__(self):
        if self.text_padding not in ("bucket", "max_length"):
            raise ConfigError(f"unknown text_padding {self.text_padding!r}; valid: bucket, max_length")
        if self.head not in ("linear", "affine", "conse", "none"):
            raise ConfigError(f"unknown head {self.head!r}; valid: linear, affine, conse, none")
        for key in ("text_head", "vision_head"):
            value = getattr(self, key)
            if value not in ("", "linear", "affine", "none"):
                raise ConfigError(f"unknown {key} {value!r}; valid: linear, affine, none (or '' for head)")
            if value and self.head == "conse":
                raise ConfigError(f"{key} {value!r} cannot be combined with head 'conse'")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"unknown scoring {self.scoring!r}; valid: softmax, sigmoid")
        for side, width in (("text", self.text.output_dim), ("vision", self.vision.output_dim)):
            if self.tower_head(side) == "none" and width != self.projection_dim:
                raise ConfigError(f"{side}_head 'none' needs the {side} tower's output width {width} to equal "
                                  f"projection_dim {self.projection_dim}")
        if self.head == "conse":
            if self.vision.kind != "efficientnet":
                raise ConfigError(f"head 'conse' needs an image tower with a classifier (efficientnet), "
                                      f"not {self.vision.kind!r}")
            if self.projection_dim != 2 * self.text.output_dim:
                raise ConfigError(f"head 'conse' needs projection_dim = 2 x text width = "
                                      f"{2 * self.text.output_dim}, got {self.projection_dim}")
            if self.conse_top_k < 1:
                raise ConfigError(f"conse_top_k must be >= 1, got {self.conse_top_k}")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def tower_head(self, side: str) -> str:
        """The head on `side` ("text" or "vision"): its own override, else `head`."""
        return getattr(self, f"{side}_head") or self.head

    @classmethod
    def from_hf(cls, d: dict, **overrides: Any) -> ModelConfig:
        """Reads a `hybrid-clip`, `vision-text-dual-encoder`, `clip` (transformers' CLIPModel), `siglip`
        or koclip config.json dict."""
        model_type = d.get("model_type")
        if model_type == "clip":
            return cls.from_clip(d, **overrides)
        if model_type == "siglip":
            return cls._from_siglip(d, overrides)
        if model_type not in ("hybrid-clip", "vision-text-dual-encoder", "koclip"):
            raise ConfigError(
                f"model_type {model_type!r} is not a dual encoder; "
                "valid: hybrid-clip, vision-text-dual-encoder, clip, siglip, koclip")
        try:
            text = TextConfig.from_hf(d["text_config"])
            vision = VisionConfig.from_hf(d["vision_config"])
        except KeyError as e:
            raise ConfigError(f"lacks the key {e.args[0]!r}, which a {model_type} config has") from None
        if model_type == "hybrid-clip" and "koclip_positions" not in d["text_config"]:
            # hybrid-clip's Flax code passed positions 0..L-1 to every text tower, RoBERTa included,
            # and KoCLIP was trained and run that way.
            text = dataclasses.replace(text, positions="arange")
        kw = dict(
            text=text,
            vision=vision,
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init=d.get("logit_scale_init_value", math.log(1 / 0.07)),
        )
        koclip = d.get("koclip", {})
        for key in ("head", "text_head", "vision_head", "scoring", "logit_bias_init", "preprocess", "tokenizer",
                    "max_length", "text_prefix", "conse_top_k", "text_padding", "text_mask_padding",
                    "text_lowercase"):
            if key in koclip:
                kw[key] = koclip[key]
        if "preprocess" not in koclip:
            kw["preprocess"] = vision.kind if vision.kind in ("vit", "siglip") else "clip"
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def _from_siglip(cls, d: dict, overrides: dict) -> ModelConfig:
        """transformers' `SiglipModel` config.json (SigLIP, and SigLIP 2's fixed-resolution checkpoints,
        which share its layout): both towers end in their own heads, pairs are scored by a sigmoid,
        texts are padded to the text tower's length.  logit_scale and logit_bias come with the weights;
        the inits are the SigLIP paper's (t = log 10, b = -10), for models trained from scratch."""
        text = TextConfig.from_hf({**(d.get("text_config") or {}), "model_type": "siglip_text_model"})
        vision = VisionConfig.from_hf({**(d.get("vision_config") or {}), "model_type": "siglip_vision_model"})
        kw = dict(text=text, vision=vision, projection_dim=vision.output_dim, text_head="none", vision_head="none",
                  scoring="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0, preprocess="siglip",
                  tokenizer="", **siglip_text_inputs(text))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_clip(cls, d: dict, **overrides: Any) -> ModelConfig:
        """A transformers `CLIPConfig` dict: CLIP's text and image towers with bias-free projections,
        CLIP's preprocessing and its full context (max_position_embeddings tokens)."""
        text, vision = TextConfig.from_hf(d), VisionConfig.from_hf(d)
        kw = dict(text=text, vision=vision, projection_dim=d.get("projection_dim") or 512,
                  logit_scale_init=d.get("logit_scale_init_value", 2.6592), head="linear", preprocess="clip",
                  max_length=text.max_position_embeddings)
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict:
        d = {
            "model_type": "koclip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init,
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf(),
            "koclip": {
                "head": self.head,
                "preprocess": self.preprocess,
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "text_prefix": self.text_prefix,
            },
        }
        if self.head == "conse":
            d["koclip"]["conse_top_k"] = self.conse_top_k
        for key, default in (("text_head", ""), ("vision_head", ""), ("scoring", "softmax"),
                             ("logit_bias_init", 0.0), ("text_padding", "bucket"), ("text_mask_padding", True),
                             ("text_lowercase", False)):
            if getattr(self, key) != default:  # written only when set, so older readers see no new keys
                d["koclip"][key] = getattr(self, key)
        return d


def siglip_text_inputs(text: TextConfig) -> dict:
    """The ModelConfig fields that prepare text as a SigLIP text tower was trained on it: lowercased, padded
    to exactly its max_position_embeddings (64), the padding visible to attention (its tokenizers return
    no attention mask).  Sources: transformers' SiglipTokenizer lowercases (do_lower_case) and its
    checkpoints' tokenizer_config.json list model_input_names ["input_ids"]; for SigLIP 2, transformers'
    docs/source/en/model_doc/siglip2.md ("pass padding="max_length" and max_length=64 as that's how the
    model was trained"; "Model was trained with *lowercased* text"), the SigLIP 2 paper ("We set the text
    length to 64 and use the multilingual Gemma tokenizer [...] transforming the text to lower case before
    tokenization", quoted in google/siglip2-base-patch16-224 discussion #22: its tokenizer_config.json names
    GemmaTokenizer, which does not lowercase), and convert_siglip2_to_hf.py's tokenizer (add_eos_token=True,
    padding_side "right", model_input_names ["input_ids"]: "original one doesn't require" a mask)."""
    return dict(max_length=text.max_position_embeddings, text_padding="max_length", text_mask_padding=False,
                text_lowercase=True)


# Published architectures, and tiny variants for tests.
ROBERTA_LARGE = TextConfig(kind="roberta", vocab_size=32000, hidden_size=1024, num_hidden_layers=24,
                           num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                           type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
CLIP_VIT_B32 = VisionConfig(kind="clip", image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu")
VIT_L16 = VisionConfig(kind="vit", image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                       num_attention_heads=16, intermediate_size=4096, layer_norm_eps=1e-12, hidden_act="gelu")

KOCLIP_BASE = ModelConfig(text=ROBERTA_LARGE, vision=CLIP_VIT_B32, projection_dim=512, preprocess="clip")
KOCLIP_LARGE = ModelConfig(text=ROBERTA_LARGE, vision=VIT_L16, projection_dim=512, preprocess="vit")

TINY_TEXT = TextConfig(kind="roberta", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
TINY_CLIP = VisionConfig(kind="clip", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37)
TINY_VIT = VisionConfig(kind="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, layer_norm_eps=1e-12, hidden_act="gelu")
TINY = ModelConfig(text=TINY_TEXT, vision=TINY_CLIP, projection_dim=16, max_length=16)
