"""Reading every supported checkpoint format as a config and named arrays, and writing koclip's own.

Formats, told apart by `config.json`'s `model_type`:

1. `hybrid-clip`: KoCLIP's original Flax checkpoints (`flax_model.msgpack`).
2. `vision-text-dual-encoder`: transformers' dual encoder (`model.safetensors`,
   `pytorch_model.bin`, or `flax_model.msgpack`).
3. Single pretrained towers (`roberta`, `bert`, `xlm-roberta`, `clip`,
   `clip_vision_model`, `vit`, `siglip_text_model`, `siglip_vision_model`), combined by
   `from_towers` with fresh projections.
4. `koclip`: koclip's own `config.json` + `model.safetensors`, written by `save`.
5. `siglip`: transformers' SiglipModel (SigLIP, SigLIP 2 fixed-resolution), `model.safetensors`
   with `text_model.*`, `vision_model.*`, `logit_scale`, `logit_bias`; read as format 2 is.
6. `clip`: transformers' CLIPModel (both towers, bias-free projections, logit_scale), read as a dual
   encoder.  It, `M-CLIP` (a text tower + an affine map into a CLIP's image space) and CLIP's
   single towers with their projections (`clip_text_model`, `clip_vision_model`) also give one side
   each of a model composed from two checkpoints (`side_source`, `side_tensors`).

A reader yields tensors under koclip's parameter names; it builds no model.
`koclip.loading` builds the model once (abstractly, from the config) and fills it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from koclip.config import ModelConfig, TextConfig, VisionConfig
from koclip.errors import CheckpointError, ConfigError
from koclip.formats import INDEX_FILES, WEIGHT_FILES, flax_msgpack, safetensors_io
from koclip.formats.convert import flat_params, rename, torch_to_flax_names
from koclip.formats.torch_zip import iter_torch_state_dict

# Tensors that checkpoints carry but the towers do not use.
_DROP_ALWAYS = [r".*position_ids$", r".*\.num_batches_tracked$"]
_TEXT_RULES = [(p, None) for p in _DROP_ALWAYS] + [
    (r"^(lm_head|cls|classifier|qa_outputs)\.", None),
    (r"^(roberta|bert|text_model|model)\.", ""),
]
_CLIP_RULES = [(p, None) for p in _DROP_ALWAYS] + [
    (r"^(text_model|text_projection|visual_projection|logit_scale)", None),
    (r"^vision_model\.vision_model\.", ""),
    (r"^vision_model\.", ""),
]
_VIT_RULES = [(p, None) for p in _DROP_ALWAYS] + [
    (r"^classifier\.", None),
    (r"^(vit|vision_model)\.", ""),
]
# SigLIP towers, alone (SiglipTextModel, SiglipVisionModel) or split out of a SiglipModel.
_SIGLIP_RULES = {
    side: [(p, None) for p in _DROP_ALWAYS] + [(rf"^({other}_model\.|logit_scale|logit_bias)", None),
                                               (rf"^{side}_model\.", "")]
    for side, other in (("text", "vision"), ("vision", "text"))
}


# The config.json keys that koclip.config reads, by what each must hold.  read_config checks them
# where they are read (the top level, text_config, vision_config, a CLIP config's own
# vision_config, and koclip), so that a malformed file fails naming the key, not later as a
# TypeError or ZeroDivisionError inside ModelConfig.
_POSITIVE_INTS = ("hidden_size", "num_attention_heads", "image_size", "patch_size", "projection_dim",
                  "max_length", "conse_top_k", "projection_size", "numDims", "transformerDimensions")
_COUNTS = ("vocab_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
           "type_vocab_size", "num_channels")
_NUMBERS = ("layer_norm_eps", "logit_scale_init_value", "logit_bias_init")
_STRINGS = ("model_type", "hidden_act", "koclip_pooling", "koclip_positions", "variant", "head", "text_head",
            "vision_head", "scoring", "preprocess", "tokenizer", "text_prefix", "text_padding", "modelBase")
_BOOLS = ("text_mask_padding", "text_lowercase", "vision_use_head")
# (text|vision)_config_dict: older CLIP configs' overrides of text_config and vision_config.
_SECTIONS = ("text_config", "vision_config", "koclip", "text_config_dict", "vision_config_dict")
_DUAL_TYPES = ("hybrid-clip", "vision-text-dual-encoder", "koclip", "siglip")


def read_config(directory) -> dict:
    """`directory`/config.json as a dict, with the values koclip reads checked for type."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(raw).__name__}, expected an object")
    _check_config(raw, path, "")
    return raw


def _check_config(d: dict, path: Path, where: str) -> None:
    def bad(key, what):
        raise CheckpointError(f"{path}: {where}{key} is {d[key]!r}, expected {what}")

    for key in _POSITIVE_INTS + _COUNTS:
        if key in d and not (type(d[key]) is int and d[key] >= (1 if key in _POSITIVE_INTS else 0)):
            bad(key, "a positive integer" if key in _POSITIVE_INTS else "a non-negative integer")
    if d.get("pad_token_id") is not None and type(d["pad_token_id"]) is not int:
        bad("pad_token_id", "an integer or null")
    for key in _NUMBERS:
        if key in d and (type(d[key]) not in (int, float) or not math.isfinite(d[key])):
            bad(key, "a finite number")
    for key in _STRINGS:
        if key in d and not isinstance(d[key], str):
            bad(key, "a string")
    for key in _BOOLS:
        if key in d and not isinstance(d[key], bool):
            bad(key, "true or false")
    for key in _SECTIONS:
        # A dual encoder reads text_config and vision_config; a CLIP config, its vision_config.
        read = key == "koclip" or d.get("model_type") in _DUAL_TYPES \
            or (key == "vision_config" and d.get("model_type") == "clip")
        if key in d and (read or d[key] is not None):
            if not isinstance(d[key], dict):
                bad(key, "an object")
            _check_config(d[key], path, f"{where}{key}.")


def find_weights(directory) -> Path:
    d = Path(directory)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    for name in INDEX_FILES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"{d}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_tensors(path) -> tuple[Iterator[tuple[str, np.ndarray]], bool]:
    """Returns (iterator of (name, array) with '.'-joined names, is_torch_layout)."""
    path = Path(path)
    if path.name in INDEX_FILES:
        try:
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e})") from None

        def chain():
            for shard in shards:
                yield from read_tensors(path.parent / shard)[0]

        return chain(), True
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return safetensors_io.iter_tensors(path), True
    if path.suffix == ".msgpack":
        return flax_msgpack.flatten(flax_msgpack.read_tree(path), path=str(path)), False
    if path.suffix in (".bin", ".pth", ".pt"):
        return iter_torch_state_dict(path), True
    raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; "
                          "valid: .safetensors, .msgpack, .bin")


def _route(items, routes, rest):
    """Sends each (name, array) of `items` through the pipeline of the first of `routes` ((prefix,
    pipeline) pairs) whose prefix starts the name, with the prefix stripped, else through `rest`; a
    pipeline maps an iterable of (name, array) to an iterator of them.

    One tensor at a time and in file order: the reader reads the next tensor only when the one
    before has been passed on, so a checkpoint is never held whole (routing the file into per-part
    lists first would hold it all, and the largest tensor's device copy on top).
    """
    for name, x in items:
        for prefix, pipeline in routes:
            if name.startswith(prefix):
                yield from pipeline([(name[len(prefix):], x)])
                break
        else:
            yield from rest([(name, x)])


def _tower_rules(cfg: TextConfig | VisionConfig):
    if cfg.kind == "siglip":
        return _SIGLIP_RULES["text" if isinstance(cfg, TextConfig) else "vision"]
    if isinstance(cfg, TextConfig):
        return _TEXT_RULES
    return {"clip": _CLIP_RULES, "vit": _VIT_RULES}.get(cfg.kind, [(p, None) for p in _DROP_ALWAYS])


def _to_targets(items, targets, torch_layout: bool, source: str, prefix: str = ""):
    """Maps named tensors to model names under `prefix`, refusing what fits nowhere."""
    if torch_layout:
        for flax_name, x, src in torch_to_flax_names(items, targets):
            if flax_name is None:
                raise CheckpointError(f"{source}: tensor {src!r} with shape {tuple(x.shape)} "
                                      "does not fit this model's config")
            yield prefix + flax_name, x
    else:
        for name, x in items:
            yield prefix + name, x


def _sub_targets(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def dual_encoder_tensors(directory, raw: dict, config: ModelConfig, targets: dict):
    """Formats 1, 2 and 4: the weights of a directory holding both towers, as koclip names them.

    raw: the directory's config.json (read_config); config: the ModelConfig read from it;
    targets: koclip's parameter names -> (shape, dtype) (koclip.formats.convert.param_shapes of
    the model to fill), which decide how PyTorch-layout tensors map.
    Returns (iterator of (koclip name, array), the weight file's path as str).  Tensors are read
    lazily, one at a time in file order, so each can be freed once it is assigned.
    """
    weights = find_weights(directory)
    source = str(weights)
    items, torch_layout = read_tensors(weights)
    if raw.get("model_type") == "koclip":
        return items, source

    def tower(part, cfg):
        prefix, rules = f"{part}_model.", _tower_rules(cfg)
        sub = _sub_targets(targets, prefix)
        # Dual encoders nest CLIP's transformer one level deeper; the rules strip either form.
        nest = part == "vision" and cfg.kind == "clip"

        def pipeline(pairs):
            if nest:
                pairs = (("vision_model." + n, x) for n, x in pairs)
            return _to_targets(rename(pairs, rules), sub, torch_layout, source, prefix)

        return prefix, pipeline

    def rest(pairs):
        for name, x in pairs:
            if name in ("logit_scale", "logit_bias"):
                yield name, np.asarray(x, np.float32).reshape(())
            elif not any(re.match(p, name) for p in _DROP_ALWAYS):
                raise CheckpointError(f"{source}: unexpected tensor {name!r}")

    routes = [tower("text", config.text), tower("vision", config.vision),
              *(_projection_route(p, p, targets, torch_layout, source)
                for p in ("text_projection.", "visual_projection."))]
    return _route(items, routes, rest), source


def _projection_route(stored: str, named: str, targets: dict, torch_layout: bool, source: str):
    """The route of a projection stored under the prefix `stored`, which the model names `named`."""
    sub = _sub_targets(targets, named)
    return stored, lambda pairs: _to_targets(pairs, sub, torch_layout, source, named)


def tower_tensors(directory, cfg: TextConfig | VisionConfig, targets: dict):
    """Format 3: a pretrained single-tower checkpoint's weights, named as koclip's tower `cfg` names
    them.  targets: the tower's parameter names -> (shape, dtype).  Returns (iterator, source)."""
    weights = find_weights(directory)
    items, torch_layout = read_tensors(weights)
    renamed = rename(items, _tower_rules(cfg))
    return _to_targets(renamed, targets, torch_layout, str(weights)), str(weights)


def tower_may_lack(name: str) -> bool:
    """Tower parameters a single-tower checkpoint may lack (ViTForImageClassification has no pooler):
    they keep their initialised values."""
    return name.startswith("pooler.")


def tower_config(directory) -> TextConfig | VisionConfig:
    """The tower config of a single-tower checkpoint directory."""
    raw = read_config(directory)
    path = Path(directory) / "config.json"
    mt = raw.get("model_type")
    try:
        if mt in ("bert", "roberta", "xlm-roberta", "siglip_text_model"):
            return TextConfig.from_hf(raw)
        if mt in ("clip", "clip_vision_model", "vit", "siglip_vision_model"):
            return VisionConfig.from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks the key {e.args[0]!r}, which a {mt} config has") from None
    except ConfigError as e:  # koclip.config names the value; add the file
        raise CheckpointError(f"{path}: {e}") from e
    raise CheckpointError(f"{path}: model_type {mt!r} is not a tower; "
                          "valid: bert, roberta, xlm-roberta, clip, clip_vision_model, vit, siglip_text_model, "
                          "siglip_vision_model")


def dual_encoder_config(directory, raw: dict | None = None, **overrides) -> ModelConfig:
    """The ModelConfig of a dual-encoder checkpoint directory (hybrid-clip, vision-text-dual-encoder,
    siglip, koclip).  raw: its config.json when the caller has read it already; overrides: ModelConfig
    fields to set.  A value koclip.config refuses is a CheckpointError naming the file."""
    raw = raw if raw is not None else read_config(directory)
    try:
        return ModelConfig.from_hf(raw, **overrides)
    except ConfigError as e:  # koclip.config names the value; add the file
        raise CheckpointError(f"{Path(directory) / 'config.json'}: {e}") from e


# ---------------------------------------------------------------- one side of a composed model

MCLIP_TYPE = "M-CLIP"
# The CLIP each published M-CLIP text encoder was trained against, by its output width (numDims).
_MCLIP_VISION = {512: "openai/clip-vit-base-patch32", 768: "openai/clip-vit-large-patch14"}
# Hub ids from before the hub had organisations, as M-CLIP's config.json names its base model.
LEGACY_HUB_IDS = {"xlm-roberta-large": "FacebookAI/xlm-roberta-large",
                  "xlm-roberta-base": "FacebookAI/xlm-roberta-base"}
_SIDE_PREFIX = {"text": ("text_model.", "text_projection."), "vision": ("vision_model.", "visual_projection.")}


@dataclasses.dataclass(frozen=True)
class Side:
    """What one checkpoint gives one side ("text" or "vision") of a composed model: a tower and its
    pretrained projection into the joint space."""

    side: str
    directory: Path
    raw: dict  # the directory's config.json
    tower: TextConfig | VisionConfig
    head: str  # the projection: "linear" (bias-free) or "affine"
    projection_dim: int
    # A CLIPModel's logit_scale_init_value: the checkpoint holds a learned temperature (logit_scale).
    # None when it holds none.
    logit_scale_init: float | None = None
    # Text sides: the directory with the tokenizer files, and how many tokens the tower reads.
    tokenizer_dir: Path | None = None
    max_length: int = 0


def mclip_vision(raw: dict) -> str:
    """The image tower that the published M-CLIP text encoder with this config.json was trained against."""
    return _MCLIP_VISION.get(raw.get("numDims"), "openai/clip-vit-base-patch32")


def side_source(directory, side: str, *, resolve=None) -> Side:
    """The `side` ("text" or "vision") that the checkpoint in `directory` offers: a CLIPModel (`clip`,
    either side), a CLIP tower with its projection (`clip_text_model`, `clip_vision_model` saved as
    CLIP*ModelWithProjection), or M-CLIP (text).  `resolve(hub_id) -> directory` finds M-CLIP's base
    model config (`modelBase`) when it is not a local directory."""
    directory = Path(directory)
    raw = read_config(directory)
    path = directory / "config.json"
    mt = raw.get("model_type")
    projection_types = {"text": ("clip", "clip_text_model", MCLIP_TYPE), "vision": ("clip", "clip_vision_model")}
    if mt not in projection_types[side]:
        raise CheckpointError(
            f"{path}: model_type {mt!r} gives no {side} tower with a pretrained projection; valid for {side}: "
            f"{', '.join(projection_types[side])} (koclip.from_towers pairs plain towers with fresh projections)")
    try:
        if mt == MCLIP_TYPE:
            return _mclip_side(directory, raw, resolve)
        tower = TextConfig.from_hf(raw) if side == "text" else VisionConfig.from_hf(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if mt != "clip" and not any(a.endswith("WithProjection") for a in raw.get("architectures") or []):
        raise CheckpointError(f"{path}: a {mt} checkpoint without its projection (architectures "
                              f"{raw.get('architectures')}); a {side} side needs CLIP{side.capitalize()}"
                              "ModelWithProjection or CLIPModel")
    return Side(side, directory, raw, tower, "linear", raw.get("projection_dim") or 512,
                logit_scale_init=raw.get("logit_scale_init_value", 2.6592) if mt == "clip" else None,
                tokenizer_dir=directory, max_length=getattr(tower, "max_position_embeddings", 0))


def _mclip_side(directory: Path, raw: dict, resolve) -> Side:
    """M-CLIP: `modelBase`'s transformer, mean-pooled over the attention mask, then an affine map
    (`LinearTransformation`, transformerDimensions -> numDims)."""
    path = directory / "config.json"
    for key in ("modelBase", "transformerDimensions", "numDims"):
        if key not in raw:
            raise CheckpointError(f"{path}: lacks the key {key!r}, which an M-CLIP config has")
    base = mclip_base(directory, raw, resolve)
    base_raw = read_config(base)
    try:
        tower = dataclasses.replace(TextConfig.from_hf(base_raw), pooling="mean")
    except KeyError as e:
        raise CheckpointError(f"{base / 'config.json'}: lacks the key {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{base / 'config.json'}: {e}") from e
    if tower.hidden_size != raw["transformerDimensions"]:
        raise CheckpointError(f"{path}: transformerDimensions {raw['transformerDimensions']} differs from the "
                              f"hidden_size {tower.hidden_size} of its base model {base}")
    # M-CLIP ships its own tokenizer (XLM-R's); without one, the base model's.
    has_own = any((directory / f).is_file() for f in ("tokenizer.json", "sentencepiece.bpe.model", "vocab.txt"))
    # RoBERTa numbers positions from pad_token_id + 1, so it reads 2 fewer tokens than it has positions.
    reserved = tower.pad_token_id + 1 if tower.positions == "padding" else 0
    return Side("text", directory, raw, tower, "affine", raw["numDims"],
                tokenizer_dir=directory if has_own else base, max_length=tower.max_position_embeddings - reserved)


def mclip_base(directory, raw: dict, resolve=None) -> Path:
    """The directory holding the config.json of M-CLIP's `modelBase`: a folder of that name inside the
    checkpoint, a local path, else a hub id (an old one without owner, such as "xlm-roberta-large", under
    its current name) through `resolve`."""
    name = raw["modelBase"]
    for candidate in (Path(directory) / name, Path(name).expanduser()):
        if (candidate / "config.json").is_file():
            return candidate
    if resolve is None:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: modelBase {name!r} is not a local directory")
    return Path(resolve(LEGACY_HUB_IDS.get(name, name)))


def side_tensors(src: Side, targets: dict, *, logit_scale: bool = False):
    """`src`'s tower and projection weights as a composed model names them (`text_model.*` and
    `text_projection.*`, or `vision_model.*` and `visual_projection.*`), plus `logit_scale` when asked
    for; the checkpoint's other tensors (a CLIPModel's other side) are dropped.  targets: the composed
    model's parameter names -> (shape, dtype).  Returns (iterator, the weight file's path as str); like
    `dual_encoder_tensors`, it reads the file one tensor at a time."""
    weights = find_weights(src.directory)
    source = str(weights)
    items, torch_layout = read_tensors(weights)
    tower_prefix, projection = _SIDE_PREFIX[src.side]
    if src.raw.get("model_type") == MCLIP_TYPE:
        stored = ("transformer.", "LinearTransformation.")
        # AutoModel gives XLMRobertaModel a pooler, which mean pooling never reads.
        rules = [(r"^pooler\.", None)] + _tower_rules(src.tower)
    else:
        stored = (tower_prefix, projection)
        rules = _tower_rules(src.tower)
    other = tuple(p for side, ps in _SIDE_PREFIX.items() if side != src.side for p in ps)
    tower_targets = _sub_targets(targets, tower_prefix)
    nest = isinstance(src.tower, VisionConfig) and src.tower.kind == "clip"

    def tower(pairs):
        if nest:  # _CLIP_RULES strip either nesting
            pairs = (("vision_model." + n, x) for n, x in pairs)
        return _to_targets(rename(pairs, rules), tower_targets, torch_layout, source, tower_prefix)

    def rest(pairs):
        for name, x in pairs:
            if name == "logit_scale":
                if logit_scale:
                    yield name, np.asarray(x, np.float32).reshape(())
            elif not (name.startswith(other) or any(re.match(p, name) for p in _DROP_ALWAYS)):
                raise CheckpointError(f"{source}: unexpected tensor {name!r}")

    routes = [(stored[0], tower), _projection_route(stored[1], projection, targets, torch_layout, source)]
    return _route(items, routes, rest), source


def save(model, directory, tokenizer=None) -> Path:
    """Writes koclip's own format: config.json (`model.config.to_hf()`) + model.safetensors (every
    variable of `model`, by its '.'-joined name), atomically.

    With `tokenizer` (a transformers tokenizer, e.g. `processor.tokenizer`), its
    files are saved too, so the directory loads with no hub.  The directory is
    filled under a temporary name and renamed into place, so a crash never
    leaves a half-written checkpoint.  Returns the directory.  `koclip.save`
    refuses quantised models before calling this.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    os.chmod(tmp, 0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2, ensure_ascii=False))
        arrays = ((k, np.asarray(jax.device_get(v))) for k, v in sorted(flat_params(model).items()))
        safetensors_io.write(tmp / "model.safetensors", arrays, metadata={"format": "koclip"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            _rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        _rmtree(tmp)
        raise
    return directory


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
