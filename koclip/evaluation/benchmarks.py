"""The published benchmarks, read from the files a user downloads (their licences forbid shipping most).

    ds = open_benchmark("xm3600", lang="ko", data_dir="~/data/xm3600")       # a CaptionDataset
    ds = open_benchmark("babel-imagenet", lang="ko", data_dir="~/data/babel",
                        image_root="~/data/imagenet/val")                       # a ClassDataset

What each reader expects (the layouts as published; docs/evaluation.md has the download steps):

- `xm3600`, Crossmodal-3600 (google.github.io/crossmodal-3600): `captions.jsonl` from its
  captions.zip, one JSON object per image: `"image/key"` (the image's id), `"image/locale"`, and
  one entry per language code, `"ko": {"caption": [...], "caption/tokenized": [...],
  "caption/tokenized/lowercase": [...]}`.  The raw `caption` strings of `lang` are read (any
  language code in the file works).  Images from images.tgz: `<key>.jpg`, in `images/` beside
  the captions file, or beside it, or under `image_root`.
- `xtd10`, XTD10 (github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10): the repo's
  `XTD10/test_image_names.txt` (1,000 COCO 2014 file names, one per line) and
  `test_1kcaptions_<lang>.txt` (one caption per line, line i describing image i; es it ko pl ru
  tr zh in XTD10/, de fr in MIC/, jp in STAIR/, en in both).  `data_dir` is the repo or its XTD10
  folder.  The names are mostly `COCO_train2014_*` (about 800) and the rest `COCO_val2014_*`, so
  `image_root` is a COCO 2014 folder holding `train2014/` and `val2014/` (or all images flat).
- `babel-imagenet`, Babel-ImageNet (github.com/gregor-ge/Babel-ImageNet): the class names
  `data/babel_imagenet-298.json`, a JSON object mapping an upper-case language code to
  `[[ImageNet-1k class indices], [names]]` for the classes that have a name in that language
  (Korean: 648 of 1000).  The images are the ILSVRC2012 validation set, see `imagenet_val`.
- `fashion-mnist`: Debian's dataset-fashion-mnist (the IDX gz files), Korean or English names.

A class index of ImageNet-1k is the position of its WordNet id in sorted order (n01440764 is 0),
the order torchvision and open_clip use.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koclip.evaluation.datasets import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_KO,
    IMAGE_SUFFIXES,
    CaptionDataset,
    ClassDataset,
    DatasetError,
    add_captioned,
    idx_dataset,
)

# The names in Zalando's Fashion-MNIST README, in label order.
FASHION_MNIST_EN = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")

XM3600_URL = "https://google.github.io/crossmodal-3600/"
XTD10_URL = "https://github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10"
BABEL_URL = "https://github.com/gregor-ge/Babel-ImageNet"
IMAGENET_URL = "https://image-net.org/challenges/LSVRC/2012/"


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: `kind` is "retrieval" (R@K both ways) or "zeroshot" (top-1/top-5)."""

    name: str
    kind: str
    title: str
    source: str
    licence: str
    files: str


BENCHMARKS = {b.name: b for b in [
    Benchmark("xm3600", "retrieval", "Crossmodal-3600", XM3600_URL,
              "captions CC BY 4.0 (Google); images from Open Images, each under its own licence",
              "captions.zip (captions.jsonl) and images.tgz (3,600 <key>.jpg)"),
    Benchmark("xtd10", "retrieval", "XTD10", XTD10_URL,
              "Adobe Research License (non-commercial research only); images: COCO (Flickr terms)",
              "XTD10/test_image_names.txt, XTD10/test_1kcaptions_<lang>.txt; COCO train2014 + val2014 images"),
    Benchmark("babel-imagenet", "zeroshot", "Babel-ImageNet", BABEL_URL,
              "BabelNet Non-Commercial License; images: ImageNet terms of access",
              "data/babel_imagenet-298.json; the 50,000 ILSVRC2012 validation images"),
    Benchmark("fashion-mnist", "zeroshot", "Fashion-MNIST", "https://github.com/zalandoresearch/fashion-mnist",
              "MIT (Debian package dataset-fashion-mnist)", "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"),
]}


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _existing(path, what: str, flag: str) -> Path:
    if path is None:
        raise DatasetError(f"{what} is needed: give {flag}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{what} {p} does not exist")
    return p


# ---------------------------------------------------------------- Crossmodal-3600


def read_xm3600(data_dir, lang: str = "ko", image_root=None) -> CaptionDataset:
    """Crossmodal-3600's captions in `lang`, one row per image that has both captions and a file.

    data_dir: the folder holding captions.jsonl, or the file itself.  image_root: the folder of
    `<key>.jpg` (default: `images/` beside captions.jsonl if present, else its own folder).
    `skipped` counts images left out: no caption in `lang`, no image file, unreadable JSON.
    """
    path = _existing(data_dir, "the Crossmodal-3600 folder", "--data-dir")
    if path.is_dir():
        path = path / "captions.jsonl"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; download captions.zip from {XM3600_URL} and unzip it "
                           "there (it holds captions.jsonl)")
    if image_root is not None:
        root = _existing(image_root, "the Crossmodal-3600 image folder", "--image-root")
    else:
        root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    raw = path.read_bytes()
    skipped: Counter = Counter()
    paths, texts, languages, rows = [], [], set(), 0
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad_json"] += 1
            continue
        key = row.get("image/key") if isinstance(row, dict) else None
        if not isinstance(key, str) or not key:
            skipped["no_image"] += 1
            continue
        languages.update(k for k, v in row.items() if isinstance(v, dict) and "caption" in v)
        entry = row.get(lang)
        add_captioned(paths, texts, skipped, root / f"{key}.jpg",
                      entry.get("caption", []) if isinstance(entry, dict) else [])
    if rows and not languages:
        raise DatasetError(f"{path}: not Crossmodal-3600's captions.jsonl (no line has "
                           '"<lang>": {"caption": [...]} entries)')
    if lang not in languages:
        raise DatasetError(f"{path}: no captions in language {lang!r}; the file has: "
                           f"{', '.join(sorted(languages)) or 'none'}")
    if not paths:
        raise DatasetError(f"none of the {rows} images of {path.name} is under {root} as <image/key>.jpg; "
                           f"download images.tgz from {XM3600_URL} and extract it into {path.parent / 'images'} "
                           "(or give --image-root)")
    return CaptionDataset(paths, texts, source=str(path), skipped=skipped,
                          tag=_sha("xm3600", hashlib.sha256(raw).hexdigest(), lang,
                                   [Path(p).name for p in paths]))


# ---------------------------------------------------------------- XTD10


def _first_file(dirs, name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _lines(path: Path) -> list[str]:
    # One entry per line, aligned by position: blank lines are kept (as blank captions), only the
    # newline at the end of the file does not start another line.
    return path.read_text(encoding="utf-8-sig").splitlines()


def coco_image(root: Path, name: str) -> Path | None:
    """A COCO 2014 image by file name: `root/train2014/NAME` or `root/val2014/NAME` by the split
    in the name, or `root/NAME`; None when none exists."""
    m = re.match(r"COCO_(train|val|test)2014_", name)
    for p in ([root / f"{m.group(1)}2014" / name] if m else []) + [root / name]:
        if p.is_file():
            return p
    return None


def read_xtd10(data_dir, lang: str = "ko", image_root=None) -> CaptionDataset:
    """XTD10's 1,000 captions in `lang` with their COCO 2014 images.

    data_dir: the XTD10 repository (or its XTD10 folder).  image_root: a COCO 2014 folder with
    train2014/ and val2014/ (XTD10's images come from both), or one folder holding them all.
    Captions whose image file is missing are left out and counted in `skipped`.
    """
    d = _existing(data_dir, "the XTD10 folder", "--data-dir")
    dirs = [d, d / "XTD10", d / "MIC", d / "STAIR", d.parent / "MIC", d.parent / "STAIR"]
    names_file = _first_file(dirs[:2], "test_image_names.txt")
    if names_file is None:
        raise DatasetError(f"{d}: no test_image_names.txt (nor XTD10/test_image_names.txt); clone {XTD10_URL} "
                           "and give its folder")
    caps_file = _first_file(dirs, f"test_1kcaptions_{lang}.txt")
    if caps_file is None:
        have = sorted({p.name[len("test_1kcaptions_"):-4] for x in dirs if x.is_dir()
                       for p in x.glob("test_1kcaptions_*.txt")})
        raise DatasetError(f"{d}: no test_1kcaptions_{lang}.txt for language {lang!r}; found: "
                           f"{', '.join(have) or 'none'}")
    if image_root is None:
        raise DatasetError("XTD10's images are COCO 2014's: give --image-root, a folder holding train2014/ and "
                           "val2014/ from https://cocodataset.org (train2014.zip, val2014.zip)")
    root = _existing(image_root, "the COCO 2014 image folder", "--image-root")
    names, caps = [n.strip() for n in _lines(names_file)], _lines(caps_file)
    if len(names) != len(caps):
        raise DatasetError(f"{caps_file} has {len(caps)} lines but {names_file} names {len(names)} images; "
                           "they must be aligned line by line")
    skipped: Counter = Counter()
    paths, texts = [], []
    for name, cap in zip(names, caps):
        cap = " ".join(cap.split())
        if not name or not cap:
            skipped["no_caption" if name else "no_image"] += 1
            continue
        image = coco_image(root, name)
        if image is None:
            skipped["missing_file"] += 1
            continue
        paths.append(str(image))
        texts.append((cap,))
    if not paths:
        raise DatasetError(f"none of the {len(names)} XTD10 images is under {root} (tried e.g. "
                           f"{root / 'train2014' / names[0] if names else root}); --image-root must hold "
                           "COCO's train2014/ and val2014/")
    return CaptionDataset(paths, texts, source=str(caps_file), skipped=skipped,
                          tag=_sha("xtd10", caps_file.read_bytes(), names_file.read_bytes(),
                                   [Path(p).name for p in paths]))


# ---------------------------------------------------------------- ImageNet validation images

_WNID = re.compile(r"n\d{8}")


def _find_up(start: Path, name: str, levels: int = 4) -> Path | None:
    d = start
    for _ in range(levels + 1):
        if (d / name).is_file():
            return d / name
        d = d.parent
    return None


def _wnid_order(root: Path, seen) -> list[str]:
    """The 1000 WordNet ids in class order: LOC_synset_mapping.txt (Kaggle's download) if found
    near `root`, else the sorted ids of `seen` when all 1000 are there."""
    mapping = _find_up(root, "LOC_synset_mapping.txt")
    if mapping is not None:
        order = [ln.split()[0] for ln in mapping.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(order) != 1000 or not all(_WNID.fullmatch(w) for w in order):
            raise DatasetError(f"{mapping}: expected 1000 lines 'nXXXXXXXX name', found {len(order)}")
        return order
    seen = sorted(set(seen))
    if len(seen) != 1000:
        raise DatasetError(f"{root}: {len(seen)} ImageNet classes found, not 1000, so their class indices cannot "
                           "be worked out; put Kaggle's LOC_synset_mapping.txt (the 1000 ids in order) beside it")
    return seen


def _read_labels(path: Path):
    """(file stem, label) pairs from a labels file, label an int class index or a WordNet id.

    Formats: Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the first token of the
    prediction string is the WordNet id), or lines `<file name> <label>` (Caffe's val.txt).
    """
    text = path.read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0]
    pairs = []
    if first.replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.DictReader(io.StringIO(text)):
            pred = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and pred:
                pairs.append((row["ImageId"], pred[0]))
        return pairs
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) == 1:
            raise DatasetError(
                f"{path}:{n}: one column only; the devkit's ILSVRC2012_validation_ground_truth.txt numbers classes "
                "by ILSVRC2012_ID, not the usual class index, and needs the devkit's meta.mat: use Kaggle's "
                "LOC_val_solution.csv, a '<file> <class index>' file, or the folder-per-class layout")
        pairs.append((Path(parts[0]).stem, parts[1]))
    return pairs


def imagenet_val(image_root, labels=None) -> tuple[list[str], np.ndarray]:
    """ImageNet-1k validation images and their class indices (0..999, sorted-WordNet-id order).

    Layouts: `image_root/<wnid>/*.JPEG` (a folder per class, as valprep.sh and torchvision leave
    it; `image_root/val/<wnid>/` too), or all images in one folder with a labels file: `labels`,
    or LOC_val_solution.csv found in image_root or up to four folders above (Kaggle's layout
    ILSVRC/Data/CLS-LOC/val/).  Returns (paths, labels (n,) int64), paths sorted.
    """
    root = _existing(image_root, "the ImageNet validation folder", "--image-root")
    if (root / "val").is_dir() and not any(_WNID.fullmatch(p.name) for p in root.iterdir() if p.is_dir()):
        root = root / "val"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and _WNID.fullmatch(p.name))
    if folders:
        index = {w: i for i, w in enumerate(_wnid_order(root, folders))}
        items = [(str(f), index[w]) for w in folders for f in sorted((root / w).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        label_file = Path(labels).expanduser() if labels else _find_up(root, "LOC_val_solution.csv")
        if label_file is None or not label_file.is_file():
            raise DatasetError(f"{root}: no folder per class (n01440764/, ...) and no labels file; give --labels "
                               "(LOC_val_solution.csv or '<file> <class index>' lines) or sort the images "
                               "into class folders")
        files = {p.stem: p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        pairs = _read_labels(label_file)
        wnids = [lab for _, lab in pairs if _WNID.fullmatch(lab)]
        index = {w: i for i, w in enumerate(_wnid_order(label_file.parent, wnids))} if wnids else {}
        items = []
        for stem, lab in pairs:
            if stem not in files:
                continue
            if lab in index:
                items.append((str(files[stem]), index[lab]))
            elif lab.isdigit() and int(lab) < 1000:
                items.append((str(files[stem]), int(lab)))
            else:
                raise DatasetError(f"{label_file}: label {lab!r} of {stem} is neither a class index 0..999 "
                                   "nor a WordNet id")
        if not items:
            raise DatasetError(f"{label_file} names {len(pairs)} images but none of them is in {root}")
    items.sort()
    return [p for p, _ in items], np.asarray([c for _, c in items], np.int64)


# ---------------------------------------------------------------- Babel-ImageNet


def babel_classnames(path, lang: str = "ko") -> tuple[list[int], list[str]]:
    """Babel-ImageNet's (ImageNet class indices, names) for `lang` (case-insensitive: "ko" -> "KO").

    path: the JSON file, or a folder holding babel_imagenet-298.json (or babel_imagenet.json).
    """
    p = _existing(path, "the Babel-ImageNet class-name file", "--data-dir")
    if p.is_dir():
        found = [p / n for n in ("babel_imagenet-298.json", "babel_imagenet.json") if (p / n).is_file()]
        found += sorted(p.glob("data/babel_imagenet*.json")) + sorted(p.glob("babel_imagenet*.json"))
        if not found:
            raise DatasetError(f"{p}: no babel_imagenet-298.json; download data/babel_imagenet-298.json from "
                               f"{BABEL_URL}")
        p = found[0]
    try:
        table = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{p}: expected a JSON object mapping language codes to [indices, names]")
    key = next((k for k in (lang, lang.upper(), lang.lower()) if k in table), None)
    if key is None:
        raise DatasetError(f"{p}: no class names for language {lang!r}; {len(table)} languages, e.g. "
                           f"{', '.join(sorted(table)[:12])}")
    entry = table[key]
    ok = (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, list) for x in entry)
          and len(entry[0]) == len(entry[1]))
    idx = entry[0] if ok else []
    if not ok or not all(isinstance(i, int) and 0 <= i < 1000 for i in idx) or len(set(idx)) != len(idx):
        raise DatasetError(f"{p}: {key!r} is not [[distinct class indices 0..999], [names]] of equal length")
    return list(idx), [str(n) for n in entry[1]]


def read_babel_imagenet(data_dir, lang: str = "ko", image_root=None, labels=None) -> ClassDataset:
    """Zero-shot classification over the ImageNet validation images of the classes that have a
    name in `lang`, named as Babel-ImageNet names them (class i of the dataset is the i-th name)."""
    indices, names = babel_classnames(data_dir, lang)
    if image_root is None:
        raise DatasetError("Babel-ImageNet's images are ImageNet's validation set: give --image-root "
                           f"(a folder per class, or a flat folder with --labels; {IMAGENET_URL})")
    paths, classes = imagenet_val(image_root, labels)
    pos = {c: i for i, c in enumerate(indices)}
    keep = [i for i, c in enumerate(classes) if int(c) in pos]
    if not keep:
        raise DatasetError(f"{image_root}: no validation image of the {len(indices)} classes named in {lang!r}")
    root = Path(image_root).expanduser()
    kept = [paths[i] for i in keep]
    return ClassDataset(names, [pos[int(classes[i])] for i in keep], paths=kept, source=f"babel-imagenet:{lang}",
                        tag=_sha("babel", indices, names, [os.path.relpath(p, root) for p in kept],
                                 classes[keep].tobytes()))


# ---------------------------------------------------------------- Fashion-MNIST


def fashion_mnist(lang: str = "ko", split: str = "test", data_dir=None) -> ClassDataset:
    """Fashion-MNIST (Debian's dataset-fashion-mnist, or the IDX gz files in `data_dir`) with
    Korean ("ko") or English ("en") class names."""
    names = {"ko": FASHION_MNIST_KO, "en": FASHION_MNIST_EN}.get(lang)
    if names is None:
        raise DatasetError(f"fashion-mnist has class names in ko and en, not {lang!r}")
    d = Path(data_dir).expanduser() if data_dir else FASHION_MNIST_DIR
    if not d.is_dir():
        raise DatasetError(f"fashion-mnist is not at {d}; install Debian's dataset-fashion-mnist (`make datasets`) "
                           "or give --data-dir, a folder with the four IDX gz files from "
                           "https://github.com/zalandoresearch/fashion-mnist")
    return idx_dataset(d, split, list(names))


def open_benchmark(name: str, *, lang: str = "ko", data_dir=None, image_root=None, split: str = "test",
                   labels=None):
    """The named benchmark's dataset (see `BENCHMARKS`): a CaptionDataset or a ClassDataset."""
    if name == "xm3600":
        return read_xm3600(data_dir, lang, image_root)
    if name == "xtd10":
        return read_xtd10(data_dir, lang, image_root)
    if name == "babel-imagenet":
        return read_babel_imagenet(data_dir, lang, image_root, labels)
    if name == "fashion-mnist":
        return fashion_mnist(lang, split, data_dir)
    raise DatasetError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
