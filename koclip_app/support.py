"""What the demo app needs from the library, without Streamlit.

- `choose_default_model()`: which model the app starts with (KOCLIP_MODEL, else
  koclip-base when its files are cached or the hub answers, else koclip-mini).
- `Engine`: a loaded model and processor with LRU caches of text and image
  embeddings, and the three tasks of the app: `classify` (image to text),
  `search` (text to image over an index) and `patches` (text to patch).
- `gallery_index(engine, folder=None)`: the index to search: a precomputed one
  under `embeddings/` when it fits the model, else one built on first use and
  kept in the cache folder.

The Streamlit side (st.cache_resource, widgets) lives in koclip_app/ui.py.
Not part of the koclip library: a user without the app never needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import huggingface_hub as hf
import numpy as np

import koclip
from koclip import compile_cache, hub, registry
from koclip.data import gallery_dir
from koclip.embedder import Embedder
from koclip.errors import IndexFileError, KoclipError
from koclip.files import cache_root
from koclip.formats import WEIGHT_FILES
from koclip.index import build_index, load_index, scan_images
from koclip.patches import rank_patches
from koclip.processing import DEFAULT_TEMPLATE, KOREAN_TEMPLATES, apply_template, clean_labels

log = logging.getLogger("koclip.app")

MODEL_ENV = "KOCLIP_MODEL"
EMBEDDINGS_ENV = "KOCLIP_EMBEDDINGS_DIR"
OFFLINE_MODEL = "koclip-mini"
HUB_MODEL = "koclip-base"
PROBE_SECONDS = 3.0
MIN_LABELS = 2
MAX_LABELS = 64
# Biggest folder the app embeds by itself; larger ones should be indexed with `koclip index build`.
MAX_APP_GALLERY = 2000
# A model's tokenizer is cached when one of these is: a tokenizers JSON, WordPiece vocabulary or SentencePiece model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- which model

class ModelChoice(NamedTuple):
    """The model the app starts with, and why (a note for the user, or None)."""

    name: str
    note: str | None


def hub_model_cached(name: str) -> bool:
    """True when the config, one weight file and the tokenizer of registry model `name` are in the
    local huggingface_hub cache, so it loads without the network."""
    preset = registry.get(name)
    if preset.source.startswith("builtin:"):
        return True

    def cached(repo: str, filename: str) -> bool:
        return isinstance(hf.try_to_load_from_cache(repo, filename), str)

    def checkpoint_cached(repo: str) -> bool:
        return cached(repo, "config.json") and any(cached(repo, f) for f in WEIGHT_FILES)

    if not all(checkpoint_cached(repo) for repo in preset.sources):
        return False
    tokenizer = dict(preset.overrides).get("tokenizer", preset.source)
    return any(cached(repo, f) for repo in dict.fromkeys((preset.source, tokenizer)) for f in TOKENIZER_FILES)


def choose_default_model(env=None, *, probe: Callable[[float], bool] | None = None,
                         timeout: float = PROBE_SECONDS) -> ModelChoice:
    """KOCLIP_MODEL (a registry name or a local checkpoint directory) when set; else koclip-base
    when it is cached or the hub answers within `timeout` seconds; else koclip-mini, with a note."""
    env = os.environ if env is None else env
    override = env.get(MODEL_ENV, "").strip()
    if override:
        return ModelChoice(override, None)
    try:
        if hub_model_cached(HUB_MODEL):
            return ModelChoice(HUB_MODEL, None)
    except Exception as e:  # noqa: BLE001 - a broken cache must not stop the app from starting
        log.warning("could not inspect the hub cache: %s", e)
    if (probe or hub.hub_reachable)(timeout):
        return ModelChoice(HUB_MODEL, None)
    return ModelChoice(OFFLINE_MODEL, (
        f"{HUB_MODEL} 가중치가 캐시에 없고 허브에 연결할 수 없어 오프라인 모델 {OFFLINE_MODEL}을(를) 사용합니다. "
        f"/ {HUB_MODEL} is not cached and the hub is unreachable, so the offline model "
        f"{OFFLINE_MODEL} is used."))


def model_options(current: str) -> list[str]:
    """Registry names, plus `current` when it is something else (a local directory or hub id)."""
    names = registry.available_models()
    return names if current in names else [current, *names]


def describe_source(info) -> str:
    """A LoadInfo -> one line saying where the weights came from and how long loading took."""
    if info.source == "installed packages":
        where = "설치된 패키지 / installed packages"
    elif Path(info.source).expanduser().is_dir():
        where = f"로컬 폴더 / local folder `{info.path}`"
    else:
        where = f"허브 / hub `{info.source}` (캐시 / cache `{info.path}`)"
    return f"{where} · {info.seconds:.1f} s"


# ---------------------------------------------------------------- caches

class LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class Ranked(NamedTuple):
    """A label and its score: a probability (softmax on) or a cosine similarity (off)."""

    label: str
    score: float


def prepare_labels(text: str | Sequence[str]) -> tuple[list[str], list[str], int]:
    """Labels typed one per line -> (kept, repeated, blank lines): blanks and repeats are dropped.

    Raises KoclipError when fewer than MIN_LABELS or more than MAX_LABELS remain.
    """
    lines = text.splitlines() if isinstance(text, str) else list(text)
    kept, dropped = clean_labels(lines)
    repeated = [" ".join(str(d).split()) for d in dropped if str(d).strip()]
    blanks = len(dropped) - len(repeated)
    if len(kept) < MIN_LABELS:
        raise KoclipError(f"서로 다른 라벨을 {MIN_LABELS}개 이상 입력하세요 (지금 {len(kept)}개). / "
                          f"Enter at least {MIN_LABELS} different labels, one per line (got {len(kept)}).")
    if len(kept) > MAX_LABELS:
        raise KoclipError(f"라벨은 최대 {MAX_LABELS}개입니다 (지금 {len(kept)}개). / "
                          f"At most {MAX_LABELS} labels (got {len(kept)}).")
    return kept, repeated, blanks


class Engine:
    """A loaded model and its processor, with embedding caches, for the app.

    `texts(list of n str)` -> (n, d) embeddings; `image(PIL image, key)` -> (d,).
    Both are cached (LRU, keyed by the text or by the caller's image key), so a
    rerun with the same labels or the same photo skips the model.
    """

    def __init__(self, model, processor, *, text_cache: int = 4096, image_cache: int = 64, gallery_cache: int = 4):
        info = getattr(model, "load_info", None)
        # The library's wrapper does the encoding; the Engine adds the caches and the app's tasks.
        # Its fingerprint is that of `koclip index build --model NAME`, so precomputed indexes match.
        self.embedder = Embedder(model, processor, name=info.name if info else type(model).__name__)
        self.model, self.processor, self.info, self.name = model, processor, info, self.embedder.name
        self._texts = LRU(text_cache)
        self._images = LRU(image_cache)
        # Bounded: every folder typed into "your gallery" would otherwise keep its index for good.
        self._galleries = LRU(gallery_cache)
        self._gallery_lock = threading.Lock()

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32 L2-normalised embeddings; only unseen texts go through the model."""
        out = [self._texts.get(t) for t in texts]
        missing = list(dict.fromkeys(t for t, z in zip(texts, out) if z is None))
        if missing:
            fresh = dict(zip(missing, self.embedder.encode_texts(missing)))
            for t, v in fresh.items():
                self._texts.put(t, v)
            out = [fresh[t] if z is None else z for t, z in zip(texts, out)]
        return np.stack(out) if out else np.zeros((0, self.embedder.dim), np.float32)

    def image(self, image, key: str | None = None) -> np.ndarray:
        """One PIL image -> (d,) embedding; cached under `key` when given (e.g. a hash of the file)."""
        if key is not None:
            z = self._images.get(key)
            if z is not None:
                return z
        z = self.embedder.encode_images([image])[0]
        if key is not None:
            self._images.put(key, z)
        return z

    def label_vectors(self, labels: Sequence[str], templates: Sequence[str | None]) -> np.ndarray:
        """(n,) labels -> (n, d): each label put into every template, embeddings averaged, renormalised."""
        prompts = [p for t in templates for p in apply_template(labels, t)]
        z = self.texts(prompts).reshape(len(templates), len(labels), -1).mean(axis=0)
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    def classify(self, image, labels: Sequence[str], *, template: str | None = DEFAULT_TEMPLATE,
                 ensemble: bool = False, softmax: bool = True, image_key: str | None = None) -> list[Ranked]:
        """Zero-shot classification of one image over `labels`, best first.

        template: prompt with '{}' for the label, or None/'' for the bare label.
        ensemble: average over KOREAN_TEMPLATES (and `template`, when it is another one).
        softmax: scores are the model's label probabilities (KoCLIP.label_probabilities, as the
            CLI prints them); off, they are the cosine similarities.
        """
        if ensemble:
            templates = list(dict.fromkeys([template or None, *KOREAN_TEMPLATES]))
        else:
            templates = [template or None]
        ztxt = self.label_vectors(labels, templates)
        zimg = self.image(image, image_key)
        scores = self.model.label_probabilities(zimg[None], ztxt)[0] if softmax else ztxt @ zimg
        order = np.argsort(-scores, kind="stable")
        return [Ranked(labels[i], float(scores[i])) for i in order]

    def search(self, index, query: str, k: int):
        """Top-k images of `index` for a text query: list of koclip.index.SearchResult."""
        return index.search(self.texts([query])[0], k=k)

    def gallery(self, folder=None, *, progress: Callable[[int, int], None] | None = None,
                rebuild: bool = False) -> Gallery:
        """gallery_index(self, folder), kept in memory: later calls for one of the last few folders are free.

        One build at a time per model: a second session asking for the same folder waits for it.
        """
        key = str(Path(folder).expanduser().resolve()) if folder else ""
        with self._gallery_lock:
            g = None if rebuild else self._galleries.get(key)
            if g is None:
                g = gallery_index(self, folder, progress=progress, rebuild=rebuild)
                self._galleries.put(key, g)
            return g

    def patches(self, image, query: str, rows: int, cols: int):
        """koclip.patches.rank_patches with the query embedding taken from the cache."""
        return rank_patches(self.model, self.processor, image, self.texts([query])[0], rows, cols)


def load_engine(name: str) -> Engine:
    """koclip.load(name) wrapped in an Engine."""
    # A restarted app reuses the compiled programs of the last one.
    compile_cache.enable()
    model, processor = koclip.load(name, precision="auto")
    log.info("loaded %s from %s in %.1f s", name, model.load_info.source, model.load_info.seconds)
    return Engine(model, processor)


# ---------------------------------------------------------------- gallery indexes

def embeddings_dir() -> Path:
    """Precomputed indexes: $KOCLIP_EMBEDDINGS_DIR, else `embeddings/` in the working directory
    (where `streamlit run app.py` runs), else `embeddings/` of a source checkout of koclip."""
    env = os.environ.get(EMBEDDINGS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    here = Path.cwd() / "embeddings"
    return here if here.is_dir() else _PROJECT_ROOT / "embeddings"


class Gallery(NamedTuple):
    """An index ready to search, and the folder its stored paths are relative to."""

    index: object  # koclip.index.Index
    root: Path
    origin: str    # "precomputed", "cached" or "built"

    def image_path(self, stored: str) -> Path:
        return self.root / stored


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:40]
    return f"{keep}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _precomputed(engine: Engine, folder: Path):
    """A committed index under embeddings_dir() built by this model over the files in `folder`."""
    root = embeddings_dir()
    if not root.is_dir():
        return None
    wanted = set(scan_images(folder))
    for meta in sorted(root.glob("*/meta.json")):
        try:
            if json.loads(meta.read_text()).get("model") != engine.name:
                continue
            index = load_index(meta.parent, engine.embedder)
        except (IndexFileError, OSError, ValueError) as e:
            log.info("not using %s: %s", meta.parent, e)
            continue
        # The index stores paths relative to the folder it was built from; that folder's
        # absolute path differs between machines, so match by the relative paths.  (A photo
        # whose bytes repeat another's is stored once, hence a subset.)
        if index.count and set(index.paths) <= wanted:
            return index
        log.info("not using %s: its images are not those of %s", meta.parent, folder)
    return None


def gallery_index(engine: Engine, folder=None, *, progress: Callable[[int, int], None] | None = None,
                  rebuild: bool = False) -> Gallery:
    """The index for text-to-image search over `folder` (default: koclip's bundled gallery).

    Order of preference: a `.kidx` index path given as `folder` (loaded as is); a
    precomputed index under embeddings_dir() built by this model over the same
    files; one built earlier by the app in koclip's cache folder (koclip.files.cache_root);
    else a new one, built now (`progress(done, total)` is called after each batch) and saved there.
    """
    folder = Path(folder).expanduser() if folder else gallery_dir()
    if (folder / "meta.json").is_file():
        index = load_index(folder, engine.embedder)
        return Gallery(index, index.root, "precomputed")
    if not folder.is_dir():
        raise KoclipError(f"갤러리 폴더 {str(folder)!r}이(가) 없습니다 / gallery folder {str(folder)!r} "
                          "does not exist or is not a folder; give a folder of images or a .kidx index")
    folder = folder.resolve()
    if not rebuild:
        index = _precomputed(engine, folder)
        if index is not None:
            return Gallery(index, folder, "precomputed")
    out = cache_root() / "indexes" / f"{_safe_name(engine.name)}-{engine.embedder.fingerprint}" \
        / f"{_safe_name(str(folder))}.kidx"
    files = scan_images(folder)
    if not files:
        raise KoclipError(f"폴더 {str(folder)!r}에 이미지가 없습니다 / no images in {str(folder)!r} "
                          f"(looked for {', '.join(sorted(('.jpg', '.png', '.webp', '.gif')))} and more)")
    if (out / "meta.json").is_file() and not rebuild:
        try:
            index = load_index(out, engine.embedder)
            if _still_current(out, folder, files, index):
                return Gallery(index, folder, "cached")
        except IndexFileError as e:
            log.warning("rebuilding %s: %s", out, e)
    if len(files) > MAX_APP_GALLERY:
        raise KoclipError(
            f"폴더에 이미지가 {len(files)}장 있습니다 (앱에서는 {MAX_APP_GALLERY}장까지). / {str(folder)!r} holds "
            f"{len(files)} images, more than the app embeds by itself ({MAX_APP_GALLERY}); build an index with "
            f"`koclip index build --model {engine.name} --images {folder} --out photos.kidx` and give its path")
    out.parent.mkdir(parents=True, exist_ok=True)
    embedder = _Counting(engine.embedder, len(files), progress)
    report = build_index(embedder, folder, out, batch_size=16, progress=False, num_workers=2)
    if report.skipped:
        log.warning("%d unreadable images skipped while indexing %s", len(report.skipped), folder)
    return Gallery(load_index(out, engine.embedder), folder, "built")


def _still_current(out: Path, folder: Path, files: list[str], index) -> bool:
    """An index the app built is reused while no image was added, changed or removed since."""
    if not set(index.paths) <= set(files):
        return False
    built = (out / "meta.json").stat().st_mtime
    return all((folder / f).stat().st_mtime <= built for f in files)


class _Counting:
    """Passes an embedder through, calling `progress(done, total)` after every model call."""

    def __init__(self, inner, total: int, progress):
        self.inner, self.total, self.progress, self.done = inner, total, progress, 0
        self.name, self.fingerprint, self.dim = inner.name, inner.fingerprint, inner.dim

    def preprocess(self, images):
        return self.inner.preprocess(images)

    def encode_pixels(self, pixels):
        z = self.inner.encode_pixels(pixels)
        self.done += len(z)
        if self.progress:
            self.progress(min(self.done, self.total), self.total)
        return z


__all__ = [
    "ModelChoice", "choose_default_model", "hub_model_cached", "model_options", "describe_source", "LRU",
    "Ranked", "prepare_labels", "Engine", "load_engine", "embeddings_dir",
    "Gallery", "gallery_index",
]
