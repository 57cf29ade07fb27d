"""`load`: a registry name, hub id or local directory -> (model, processor)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from flax import nnx

from koclip import hub, registry
from koclip.config import ModelConfig
from koclip.errors import CheckpointError
from koclip.fingerprint import model_digest
from koclip.formats import checkpoints
from koclip.model import KoCLIP
from koclip.processing import Processor, image_spec_for, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """Where a loaded model came from, for display."""

    name: str
    source: str
    path: str
    seconds: float
    weights: str = ""  # koclip.fingerprint.model_digest of the float32 weights, set when load quantises


def load(name: str = "koclip-mini", *, revision: str | None = None, precision: str | None = None):
    """Loads a model and its processor.

    `name`: a registry name (`koclip.available_models()`), a hub repo id, or a
    local checkpoint directory in any supported format.  Returns (model, processor);
    `model.load_info` says where the weights came from.
    """
    t0 = time.perf_counter()
    overrides: dict = {}
    if registry.is_preset(name):
        preset = registry.get(name)
        overrides = dict(preset.overrides)
        if preset.source.startswith("builtin:"):
            from koclip.mini import build

            model, processor, path = build.load_mini()
            _finish(model, name, "installed packages", path, t0)
            return _with_precision(model, precision), processor
        source = preset.source
    elif Path(name).expanduser().is_dir() or hub.is_repo_id(name):
        source = name
    else:
        registry.get(name)  # raises with the list of valid names
        raise AssertionError  # unreachable
    directory = hub.resolve(source, revision=revision, label=name)
    raw = checkpoints.read_config(directory)
    config = ModelConfig.from_hf(raw, **overrides)
    model = checkpoints.load_dual_encoder(directory, config)
    tokenizer = load_tokenizer(config.tokenizer, directory)
    processor = Processor(tokenizer, image_spec_for(config), max_length=config.max_length,
                          text_prefix=config.text_prefix)
    _finish(model, name, source, str(directory), t0)
    return _with_precision(model, precision), processor


def _finish(model, name, source, path, t0):
    # Plain attribute outside nnx's state: a frozen record of provenance.
    object.__setattr__(model, "load_info", LoadInfo(name, source, str(path), time.perf_counter() - t0))


def _with_precision(model, precision):
    """precision: None/"fp32" (exact), "bf16", "int8" (see koclip.quantize), or "auto"
    (what serves fastest here within the quality gates: `koclip.quantize.auto_plan`)."""
    if precision in (None, "fp32", "float32"):
        return model
    from koclip import quantize

    if precision == "auto":
        mode, exclude = quantize.auto_plan(model.config)
    else:
        mode, exclude = {"bfloat16": "bf16"}.get(precision, precision), None
    if mode not in quantize.MODES:
        raise CheckpointError(f"unknown precision {precision!r}; valid: fp32, bf16, int8, auto")
    # Index fingerprints need the float32 weights' digest, which quantising would change.
    object.__setattr__(model, "load_info", dataclasses.replace(model.load_info, weights=model_digest(model)))
    # In place: each float32 kernel is freed as soon as it is replaced.
    return quantize.quantize(model, mode, exclude=exclude, copy=False)


def from_towers(text: str, vision: str, *, projection_dim: int = 512, seed: int = 0,
                **config_overrides) -> KoCLIP:
    """A new model from two pretrained towers (hub ids or local dirs of RobertaModel/BertModel,
    CLIPModel/CLIPVisionModel or ViTModel) with freshly initialised projections."""
    text_dir = hub.resolve(text, label=text)
    vision_dir = hub.resolve(vision, label=vision)
    tcfg = checkpoints.tower_config(text_dir)
    vcfg = checkpoints.tower_config(vision_dir)
    if not isinstance(tcfg, type(ModelConfig().text)):
        raise CheckpointError(f"{text}: is a {tcfg.kind} image tower, not a text tower")
    if isinstance(vcfg, type(ModelConfig().text)):
        raise CheckpointError(f"{vision}: is a {vcfg.kind} text tower, not an image tower")
    config = ModelConfig(text=tcfg, vision=vcfg, projection_dim=projection_dim,
                         preprocess="vit" if vcfg.kind == "vit" else "clip", tokenizer=text, **config_overrides)
    model = KoCLIP(config, rngs=nnx.Rngs(seed))
    checkpoints.load_tower_into(model, "text", text_dir)
    checkpoints.load_tower_into(model, "vision", vision_dir)
    return model


def processor_for(model: KoCLIP, directory=None) -> Processor:
    config = model.config
    return Processor(load_tokenizer(config.tokenizer, directory), image_spec_for(config),
                     max_length=config.max_length, text_prefix=config.text_prefix)
