"""Datasets for training and evaluation, all with one small interface.

    len(ds); ds.image(i) -> PIL RGB image (raises ImageError if unreadable)
    ds.captions(i) -> tuple of caption strings; ds.take(indices) -> a subset
    ds.fingerprint() -> str naming the exact contents (for feature caches)

Kinds:
- `CaptionDataset`: images with captions, from JSONL (`{"image": path,
  "captions": [...]}` per line) or KoCLIP's original JSON (a list of
  `{"file_path": ..., "captions": [...]}`).  Rows with no image, a missing file
  or no non-blank caption are skipped and counted in `skipped`.
- `ClassDataset`: labelled images (an IDX gz pair such as Fashion-MNIST, or a
  folder per class); its captions are the class name put into each template.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from koclip.errors import KoclipError
from koclip.processing import KOREAN_TEMPLATES, apply_template

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_KO = ("티셔츠/상의", "바지", "풀오버", "드레스", "코트", "샌들", "셔츠", "스니커즈", "가방", "앵클 부츠")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class DatasetError(KoclipError):
    """A dataset file or folder that cannot be read as any supported kind."""


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _stat(path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class CaptionDataset:
    """Image files with captions.  `skipped` counts rows dropped while reading, by reason."""

    def __init__(self, paths: Sequence[str], texts: Sequence[tuple[str, ...]], *, source: str = "",
                 skipped: Counter | None = None, tag: str = ""):
        self.paths = list(paths)
        self.texts = [tuple(t) for t in texts]
        self.source = source
        self.skipped = Counter(skipped or {})
        self._tag = tag or _digest(source, self.paths, self.texts)

    def __len__(self):
        return len(self.paths)

    def image(self, i):
        from koclip.images import open_image

        return open_image(self.paths[i])

    def captions(self, i) -> tuple[str, ...]:
        return self.texts[i]

    def take(self, indices) -> CaptionDataset:
        idx = [int(i) for i in indices]
        return CaptionDataset([self.paths[i] for i in idx], [self.texts[i] for i in idx],
                              source=self.source, tag=_digest(self._tag, idx))

    def fingerprint(self) -> str:
        return self._tag


def add_captioned(paths: list[str], texts: list[tuple[str, ...]], skipped: Counter, image: Path, captions) -> None:
    """One row of a caption file: `image` and its `captions` (a list; each string's runs of whitespace
    made one space, blank strings and anything else dropped) are appended to `paths` and `texts`, or
    the row is counted in `skipped`: "no_caption" when none is left, "missing_file" when `image` is
    not a file."""
    caps = tuple(" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip())
    if not caps:
        skipped["no_caption"] += 1
    elif not image.is_file():
        skipped["missing_file"] += 1
    else:
        paths.append(str(image))
        texts.append(caps)


def read_captions(path, image_root=None) -> CaptionDataset:
    """Reads a JSONL or KoCLIP-JSON caption file.

    Relative image paths are taken from `image_root`, by default the file's folder.
    Raises DatasetError for a missing file or one that is neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"caption file {path} does not exist")
    root = Path(image_root) if image_root else path.parent
    text = path.read_text(encoding="utf-8")
    skipped: Counter = Counter()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a list of {{file_path, captions}} objects")
    else:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
    paths, texts = [], []
    for row in rows:
        if not isinstance(row, dict):
            skipped["bad_json"] += 1
            continue
        image = row.get("image", row.get("file_path"))
        if not isinstance(image, str) or not image:
            skipped["no_image"] += 1
            continue
        caps = row.get("captions", row.get("caption", []))
        if isinstance(caps, str):
            caps = [caps]
        add_captioned(paths, texts, skipped, Path(image) if os.path.isabs(image) else root / image, caps)
    if not paths and rows:
        raise DatasetError(f"{path}: none of its {len(rows)} rows is usable ({dict(skipped)}); "
                           'each needs {"image": path, "captions": [...]} with an existing image')
    return CaptionDataset(paths, texts, source=str(path), skipped=skipped,
                          tag=_digest(_stat(path), str(root)))


class ClassDataset:
    """Labelled images.  `pixels` (n, H, W[, 3]) uint8 or `paths`; `labels` (n,) int."""

    def __init__(self, classnames: Sequence[str], labels, *, pixels=None, paths=None,
                 templates: Sequence[str] = KOREAN_TEMPLATES, source: str = "", tag: str = ""):
        if (pixels is None) == (paths is None):
            raise ValueError("give exactly one of pixels and paths")
        self.classnames = list(classnames)
        self.labels = np.asarray(labels, np.int64)
        self.pixels = pixels
        self.paths = list(paths) if paths is not None else None
        self.templates = tuple(templates)
        for t in self.templates:
            apply_template(["x"], t)  # raises for a template without '{}'
        self.source = source
        self.skipped: Counter = Counter()
        self._tag = tag or _digest(source, self.labels.tobytes())
        n = len(self.pixels) if self.pixels is not None else len(self.paths)
        if n != len(self.labels):
            raise DatasetError(f"{source}: {n} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise DatasetError(f"{source}: labels run from {self.labels.min()} to {self.labels.max()} "
                               f"but there are {len(self.classnames)} class names")

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        from PIL import Image

        from koclip.images import open_image

        if self.pixels is not None:
            return open_image(Image.fromarray(np.asarray(self.pixels[i])))
        return open_image(self.paths[i])

    def captions(self, i) -> tuple[str, ...]:
        name = self.classnames[self.labels[i]]
        return tuple(apply_template([name], t)[0] for t in self.templates)

    def take(self, indices) -> ClassDataset:
        idx = np.asarray(indices, np.int64)
        kw = {"pixels": self.pixels[idx]} if self.pixels is not None else {"paths": [self.paths[i] for i in idx]}
        return ClassDataset(self.classnames, self.labels[idx], templates=self.templates, source=self.source,
                            tag=_digest(self._tag, idx.tobytes()), **kw)

    def with_templates(self, templates: Sequence[str]) -> ClassDataset:
        kw = {"pixels": self.pixels} if self.pixels is not None else {"paths": self.paths}
        return ClassDataset(self.classnames, self.labels, templates=templates, source=self.source,
                            tag=self._tag, **kw)

    def fingerprint(self) -> str:
        return _digest(self._tag, self.templates)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not, into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DatasetError(f"{path}: header says {dims} but the file holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype).reshape(dims)


def _split_prefix(split: str) -> str:
    valid = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in valid:
        raise DatasetError(f"unknown split {split!r}; valid: train, test")
    return valid[split]


def idx_dataset(directory, split: str = "test", classnames: Sequence[str] | None = None,
                templates: Sequence[str] = KOREAN_TEMPLATES) -> ClassDataset:
    """An IDX pair `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` in `directory`."""
    d = Path(directory)
    prefix = _split_prefix(split)
    found = {}
    for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                found[kind] = d / name
                break
        else:
            raise DatasetError(f"{d}: no {stem}[.gz]; an IDX dataset folder holds "
                               f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz")
    pixels = read_idx(found["images"])
    labels = read_idx(found["labels"]).astype(np.int64)
    if classnames is None:
        classnames = [str(i) for i in range(int(labels.max()) + 1)]
    return ClassDataset(classnames, labels, pixels=pixels, templates=templates, source=f"{d}:{split}",
                        tag=_digest(_stat(found["images"]), _stat(found["labels"])))


def read_classnames(path) -> list[str] | dict[str, str]:
    """A classnames file: one name per line (in class order), or `folder<TAB>name` lines."""
    lines = [ln.strip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        return dict(ln.split("\t", 1) for ln in lines)
    return [ln.strip() for ln in lines]


def folder_dataset(root, classnames=None, templates: Sequence[str] = KOREAN_TEMPLATES) -> ClassDataset:
    """`root/<class folder>/<image files>`; classes in sorted folder order.

    classnames: a list (in that order), a {folder: name} dict, a file path
    (see `read_classnames`), or None for `root/classnames.txt` if present, else the folder names.
    """
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no class folders; expected one folder of images per class")
    if classnames is None and (root / "classnames.txt").is_file():
        classnames = root / "classnames.txt"
    if isinstance(classnames, (str, os.PathLike)):
        classnames = read_classnames(classnames)
    if isinstance(classnames, dict):
        names = [classnames.get(f, f) for f in folders]
    elif classnames is None:
        names = folders
    else:
        names = list(classnames)
        if len(names) != len(folders):
            raise DatasetError(f"{root}: {len(folders)} class folders but {len(names)} class names")
    paths, labels = [], []
    for c, f in enumerate(folders):
        for p in sorted((root / f).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(p))
                labels.append(c)
    return ClassDataset(names, labels, paths=paths, templates=templates, source=str(root),
                        tag=_digest(str(root.resolve()), paths, [os.path.getsize(p) for p in paths]))


def open_dataset(spec, *, split: str = "test", classnames=None, templates: Sequence[str] | None = None,
                 image_root=None):
    """A dataset from a name or path.

    spec: "fashion-mnist" (Debian's dataset-fashion-mnist, Korean class names), a
    folder holding an IDX pair, a folder with a folder per class, or a .jsonl /
    .json caption file.
    """
    templates = tuple(templates) if templates else KOREAN_TEMPLATES
    if isinstance(classnames, (str, os.PathLike)) and classnames:
        classnames = read_classnames(classnames)
    spec_s = str(spec)
    if spec_s == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise DatasetError(f"fashion-mnist is not installed at {FASHION_MNIST_DIR}; "
                               "install it with `apt-get install dataset-fashion-mnist`")
        return idx_dataset(FASHION_MNIST_DIR, split, classnames or FASHION_MNIST_KO, templates)
    p = Path(spec_s)
    if p.is_file():
        return read_captions(p, image_root)
    if p.is_dir():
        if any(p.glob("*-labels-idx1-ubyte*")):
            return idx_dataset(p, split, classnames, templates)
        return folder_dataset(p, classnames, templates)
    raise DatasetError(f"dataset {spec_s!r} not found; valid: fashion-mnist, an IDX folder, "
                       "a folder of class folders, or a .jsonl/.json caption file")
