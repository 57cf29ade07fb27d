"""`load`: a registry name, hub id or local directory -> (model, processor); `load(text=..., vision=...)`
composes a model from the text side of one checkpoint and the image side of another."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
from flax import nnx

from koclip import autotune, hub, onnx_runtime, registry
from koclip.config import ModelConfig, siglip_text_inputs
from koclip.errors import CheckpointError
from koclip.fingerprint import model_digest
from koclip.formats import checkpoints
from koclip.formats.convert import assign, param_shapes
from koclip.model import KoCLIP
from koclip.mini import build as mini_build
from koclip.mini.e5 import e5_tokenizer
from koclip.processing import Processor
from koclip.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """Where a loaded model came from, for display."""

    name: str
    source: str
    path: str
    seconds: float
    weights: str = ""  # koclip.fingerprint.model_digest of the float32 weights, set when load quantises
    # A composed model's sides (load(text=..., vision=...)): each one's name and directory.
    text: str = ""
    vision: str = ""
    precision: autotune.Plan | None = None  # each tower's precision and how it was chosen, when not fp32


def load(name: str | None = None, *, text: str | None = None, vision: str | None = None,
         revision: str | None = None, precision: str | None = None):
    """Loads a model and its processor.

    `name`: a registry name (`koclip.available_models()`), a hub repo id, or a
    local checkpoint directory in any supported format (default "koclip-mini").
    Or, instead of `name`, `text` and `vision` (hub ids or local directories): the text tower of
    one checkpoint and the image tower of another, each with its own pretrained projection
    (see `compose`), e.g. `load(text="M-CLIP/XLM-Roberta-Large-Vit-B-32",
    vision="openai/clip-vit-base-patch32")`.  Returns (model, processor);
    `model.load_info` says where the weights came from.
    """
    if text is not None or vision is not None:
        if name is not None or text is None or vision is None or revision is not None:
            raise TypeError("load takes either a name (and revision) or both text= and vision=")
        model, processor = compose(text, vision)
        return _with_precision(model, precision), processor
    name = "koclip-mini" if name is None else name
    t0 = time.perf_counter()
    overrides: dict = {}
    if registry.is_preset(name):
        preset = registry.get(name)
        overrides = dict(preset.overrides)
        if preset.source.startswith("builtin:"):
            model, processor, path = mini_build.load_mini()
            _finish(model, name, "installed packages", path, t0)
            return _with_precision(model, precision), processor
        if preset.vision:  # two checkpoints: one gives the text tower, the other the image tower
            if revision is not None:
                raise TypeError(f"{name} is made of two checkpoints ({preset.source}, {preset.vision}); "
                                "a revision cannot name both")
            model, processor = compose(preset.source, preset.vision, name=name)
            return _with_precision(model, precision), processor
        source = preset.source
    elif Path(name).expanduser().is_dir() or hub.is_repo_id(name):
        source = name
    else:
        raise registry.unknown(name)
    directory = hub.resolve(source, revision=revision, label=name)
    raw = checkpoints.read_config(directory)
    if raw.get("model_type") == checkpoints.MCLIP_TYPE:
        raise CheckpointError(
            f"{name}: an M-CLIP checkpoint holds a text tower only, mapped into a CLIP's image space; load it "
            f"with that CLIP's image tower: koclip.load(text={name!r}, vision={checkpoints.mclip_vision(raw)!r})")
    if raw.get("model_type") == "clip":  # a CLIPModel brings its own tokenizer
        overrides.setdefault("tokenizer", source)
    config = checkpoints.dual_encoder_config(directory, raw, **overrides)
    model = load_dual_encoder(directory, config, raw)
    processor = Processor.for_config(config, tokenizer_for(config, directory))
    _finish(model, name, source, str(directory), t0)
    return _with_precision(model, precision), processor


def _finish(model, name, source, path, t0, **sides):
    # Plain attribute outside nnx's state: a frozen record of provenance.
    object.__setattr__(model, "load_info", LoadInfo(name, source, str(path), time.perf_counter() - t0, **sides))


def compose(text: str, vision: str, *, name: str | None = None) -> tuple[KoCLIP, Processor]:
    """A model from the text side of checkpoint `text` and the image side of checkpoint `vision` (hub ids
    or local directories), each keeping its pretrained projection into the joint space.

    text: M-CLIP (its XLM-R/BERT, mean-pooled, and LinearTransformation), a CLIPModel (text tower and
    text_projection) or a CLIPTextModelWithProjection; vision: a CLIPModel (vision tower and
    visual_projection) or a CLIPVisionModelWithProjection.  The temperature is the vision side's
    CLIPModel's, else the text side's, else ModelConfig's default.  The processor pairs the text side's
    tokenizer with the vision side's image preprocessing.  Both sides must embed into as many
    dimensions.  Returns (model, processor); `model.load_info.text`/`.vision` name the sources, and
    `.name` is `name` (a registry preset's) or "TEXT + VISION".
    """
    t0 = time.perf_counter()
    resolve_base = lambda base: hub.resolve(base, weights=False, label=f"{text}'s base model {base}")  # noqa: E731
    ts = checkpoints.side_source(hub.resolve(text, label=text), "text", resolve=resolve_base)
    vs = checkpoints.side_source(hub.resolve(vision, label=vision), "vision")
    if ts.projection_dim != vs.projection_dim:
        raise CheckpointError(f"cannot pair {text} (text embeddings of {ts.projection_dim} dimensions) with {vision} "
                              f"(image embeddings of {vs.projection_dim} dimensions)")
    scale_from = vs if vs.logit_scale_init is not None else ts if ts.logit_scale_init is not None else None
    config = ModelConfig(
        text=ts.tower, vision=vs.tower, projection_dim=ts.projection_dim,
        text_head="" if ts.head == "linear" else ts.head, vision_head="" if vs.head == "linear" else vs.head,
        preprocess="clip",  # every vision side is a CLIP image tower
        tokenizer=text if ts.tokenizer_dir == ts.directory else str(ts.tokenizer_dir),
        max_length=ts.max_length,
        **({} if scale_from is None else {"logit_scale_init": scale_from.logit_scale_init}))
    model = nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0)))
    targets = param_shapes(model)
    text_items, text_file = checkpoints.side_tensors(ts, targets, logit_scale=scale_from is ts)
    vision_items, vision_file = checkpoints.side_tensors(vs, targets, logit_scale=scale_from is vs)
    default = [("logit_scale", np.float32(config.logit_scale_init))] if scale_from is None else []
    assign(model, itertools.chain(text_items, vision_items, default), f"{text_file} + {vision_file}")
    processor = Processor.for_config(config, tokenizer_for(config, ts.tokenizer_dir))
    _finish(model, name or f"{text} + {vision}", f"{text} + {vision}", f"{ts.directory} + {vs.directory}", t0,
            text=f"{text} ({ts.directory})", vision=f"{vision} ({vs.directory})")
    return model, processor


def _with_precision(model, precision):
    """precision: None/"fp32" (exact), "bf16", "int8" (see koclip.quantize), "ort-fp32", "ort-int8"
    (the towers exported to ONNX Runtime: koclip.onnx_runtime), or "auto" (per tower,
    what serves fastest on this machine within the quality gates, measured once: koclip.autotune)."""
    if precision in (None, "fp32", "float32"):
        return model
    mode = {"bfloat16": "bf16"}.get(precision, precision)
    if mode != "auto" and mode not in autotune.CANDIDATES:
        raise CheckpointError(f"unknown precision {precision!r}; valid: {', '.join(autotune.CANDIDATES)}, auto")
    if mode in autotune.ORT_CANDIDATES and not onnx_runtime.available():
        raise CheckpointError(f"precision {precision!r} needs onnxruntime and onnx: pip install 'koclip[onnx]'")
    plan = (autotune.plan_for(model) if mode == "auto" else
            autotune.Plan(*(autotune.runnable(model, t, mode) for t in autotune.TOWERS), "requested"))
    # Index fingerprints need the float32 weights' digest, which quantising would change.
    object.__setattr__(model, "load_info", dataclasses.replace(model.load_info, weights=model_digest(model),
                                                               precision=plan))
    # In place: each float32 kernel is freed as soon as it is replaced.
    return autotune.apply(model, plan)


def from_towers(text: str, vision: str, *, projection_dim: int = 512, seed: int = 0,
                **config_overrides) -> KoCLIP:
    """A new model from two pretrained towers (hub ids or local dirs of RobertaModel/BertModel/SiglipTextModel,
    CLIPModel/CLIPVisionModel, ViTModel or SiglipVisionModel) with freshly initialised projections."""
    text_dir = hub.resolve(text, label=text)
    vision_dir = hub.resolve(vision, label=vision)
    tcfg = checkpoints.tower_config(text_dir)
    vcfg = checkpoints.tower_config(vision_dir)
    if not isinstance(tcfg, type(ModelConfig().text)):
        raise CheckpointError(f"{text}: is a {tcfg.kind} image tower, not a text tower")
    if isinstance(vcfg, type(ModelConfig().text)):
        raise CheckpointError(f"{vision}: is a {vcfg.kind} text tower, not an image tower")
    kw = dict(text=tcfg, vision=vcfg, projection_dim=projection_dim, tokenizer=text,
              preprocess=vcfg.kind if vcfg.kind in ("vit", "siglip") else "clip",
              **(siglip_text_inputs(tcfg) if tcfg.kind == "siglip" else {}))
    config = ModelConfig(**{**kw, **config_overrides})
    model = KoCLIP(config, rngs=nnx.Rngs(seed))
    for tower, cfg, directory in ((model.text_model, tcfg, text_dir), (model.vision_model, vcfg, vision_dir)):
        tensors, source = checkpoints.tower_tensors(directory, cfg, param_shapes(tower))
        assign(tower, tensors, source, allow_missing=checkpoints.tower_may_lack)
    return model


def load_dual_encoder(directory, config: ModelConfig | None = None, raw: dict | None = None) -> KoCLIP:
    """The model in a checkpoint directory holding both towers (hybrid-clip,
    vision-text-dual-encoder or koclip's own format), built once from its config and filled.

    config: the ModelConfig to build (default: read from config.json); raw: the directory's
    config.json when the caller has read it already.
    """
    raw = raw if raw is not None else checkpoints.read_config(directory)
    config = config or checkpoints.dual_encoder_config(directory, raw)
    model = nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0)))  # shapes only: no memory yet
    tensors, source = checkpoints.dual_encoder_tensors(directory, raw, config, param_shapes(model))
    assign(model, tensors, source)
    return model


def tokenizer_for(config: ModelConfig, directory=None):
    """The tokenizer `config.tokenizer` names: the one in `directory` when it holds a tokenizer.json or a
    spiece.model (SigLIP), the bundled e5 tokenizer for "e5" (koclip-mini), else a hub id or local path
    ("" names none: SigLIP configs, whose tokenizer is the checkpoint's own)."""
    has_own = directory is not None and (Path(directory) / "tokenizer.json").is_file()
    if config.tokenizer == "e5" and not has_own:
        return e5_tokenizer()
    return load_tokenizer(config.tokenizer, directory)


def processor_for(model: KoCLIP, directory=None) -> Processor:
    """The processor for a model built in this process (e.g. by `from_towers` or training)."""
    return Processor.for_config(model.config, tokenizer_for(model.config, directory))
