"""Training configuration as data.

A run is described by one frozen `TrainConfig`.  `configs/default.py` returns
the defaults and each preset's `get_config()` overrides a few fields of it;
`--set key=value` overrides fields from the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from koclip.errors import ConfigError
from koclip.processing import KOREAN_TEMPLATES

LOSSES = ("clip", "siglip")
SCHEDULES = ("cosine", "linear", "constant")
FEATURE_MODES = ("none", "image", "text", "both")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    # --- model
    # "tiny" (the TINY test architecture, random init), "towers" (text_tower +
    # vision_tower with fresh heads), or anything koclip.load takes.
    model: str = "tiny"
    text_tower: str = ""
    vision_tower: str = ""
    projection_dim: int = 512
    # Overrides the model's tokenizer: a folder with tokenizer.json, or a hub id.
    tokenizer: str = ""
    # Tokens per caption; every batch is padded to exactly this (0: the model's max_length).
    max_length: int = 0
    # Start the projection heads and temperature afresh, keeping only the towers of `model`
    # (for each head kind: koclip.train.train.reinit_heads).
    reinit_heads: bool = False

    # --- data
    train_data: str = ""          # .jsonl / .json caption file, an IDX folder, class folders, "fashion-mnist"
    train_split: str = "train"    # for class datasets
    val_data: str = ""            # empty: hold out `val_size` examples of train_data
    val_split: str = "test"
    val_size: int = 0
    max_train_examples: int = 0   # 0: all
    image_root: str = ""
    classnames: str = ""          # for class datasets without built-in names
    templates: tuple[str, ...] = KOREAN_TEMPLATES  # captions of class datasets
    # Generated data (shapes with Korean captions) of this many examples: the smoke run.
    synthetic_examples: int = 0
    num_workers: int = 2          # decoding threads
    prefetch_batches: int = 4
    # LiT: which towers are locked, with pooled features computed once and cached.
    features: str = "none"
    feature_cache: str = ""       # default: WORKDIR/features

    # --- batches and schedule
    batch_size_per_device: int = 8
    grad_accum_steps: int = 1
    num_epochs: int = 1
    max_steps: int = 0            # stop earlier than num_epochs (0: no cap)

    # --- optimiser
    learning_rate: float = 5e-5
    end_learning_rate: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    # Parameters whose '/'-joined path matches are not decayed: biases, norm scales, temperature.
    no_decay: str = r"(.*/)?(bias|scale|logit_scale|logit_bias)"
    max_grad_norm: float = 1.0
    # Regexes over '/'-joined parameter paths (e.g. "vision_model/.*"); matches stay fixed.
    freeze: tuple[str, ...] = ()
    compute_dtype: str = "float32"

    # --- loss
    loss: str = "clip"
    local_negatives: bool = False  # negatives only from the same device's rows, as KoCLIP's pmap did
    max_logit_scale: float = math.log(100.0)
    siglip_bias_init: float = -10.0

    # --- parallelism
    # Parameters with at least this many elements are sharded over 'data' (0: all replicated).
    shard_params_min_size: int = 0

    # --- checkpoints, evaluation, logging
    seed: int = 0
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    eval_every_steps: int = 0     # 0: at the end of each epoch
    eval_batch_size: int = 64
    export_dir: str = ""          # default: WORKDIR/model
    progress: bool = True

    def __post_init__(self):
        for name, value, valid in (("loss", self.loss, LOSSES), ("schedule", self.schedule, SCHEDULES),
                                   ("features", self.features, FEATURE_MODES),
                                   ("compute_dtype", self.compute_dtype, DTYPES)):
            if value not in valid:
                raise ConfigError(f"{name}={value!r} is not valid; valid: {', '.join(valid)}")
        for name in ("batch_size_per_device", "grad_accum_steps", "num_epochs", "eval_batch_size",
                     "keep_checkpoints", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model == "towers" and not (self.text_tower and self.vision_tower):
            raise ConfigError("model='towers' needs text_tower and vision_tower")

    def replace(self, **kw) -> TrainConfig:
        unknown = [k for k in kw if k not in _FIELDS]
        if unknown:
            raise ConfigError(_unknown_message(unknown[0]))
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown_message(key: str) -> str:
    near = difflib.get_close_matches(key, _FIELDS, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid: {', '.join(_FIELDS)}"
    return f"unknown config key {key!r}{hint}"


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value converted to the field's type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in _FIELDS:
        raise ConfigError(_unknown_message(key))
    default = _FIELDS[key].default
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key} takes true or false, not {raw!r}")
        return key, low in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return key, type(default)(ast.literal_eval(raw.strip()) if type(default) is int else float(raw))
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key} takes a {type(default).__name__}, not {raw!r}") from None
    if isinstance(default, tuple):
        raw = raw.strip()
        if raw.startswith(("(", "[")):
            try:
                return key, tuple(str(x) for x in ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key}: cannot read {raw!r} as a list of strings") from None
        return key, tuple(s for s in raw.split(",") if s) if raw else ()
    return key, raw


def load_config(path, overrides=()) -> TrainConfig:
    """Runs `get_config()` of a config file, then applies 'key=value' overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    # Presets import `configs.default`: make the folder above `configs/` importable.
    parent = str(path.resolve().parent.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    spec = importlib.util.spec_from_file_location(f"_koclip_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not a TrainConfig")
    kw = dict(parse_override(o) for o in overrides)
    return cfg.replace(**kw) if kw else cfg
