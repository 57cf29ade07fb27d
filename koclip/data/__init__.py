"""Data that ships with koclip: ImageNet-1k class names, parent categories, a photo gallery.

    imagenet_classes("ko")[207]  -> "골든 리트리버"
    categories()                 -> [Category(ko="개", en="dog", classes=(151, ..., 268)), ...]
    gallery()                    -> [GalleryPhoto(path=.../astronaut.jpg, label_en="astronaut", ...)]
    ZEROSHOT_LABELS              -> (("우주비행사", "astronaut"), ...) covering every gallery label

The class files hold one name per line in the standard ImageNet-1k index order
(0 = tench ... 999 = toilet tissue); line i of the Korean file translates line i
of the English one.  The gallery holds real photographs copied from PyPI
packages by scripts/make_gallery.py; gallery/LICENSES.md names each licence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

NUM_CLASSES = 1000
LANGUAGES = ("en", "ko")
_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Category:
    """An everyday word (e.g. 개/dog) and the ImageNet class indices it covers."""

    ko: str
    en: str
    classes: tuple[int, ...]


@dataclass(frozen=True)
class GalleryPhoto:
    """One bundled photo: its JPEG file, what it shows, and where it came from."""

    path: Path
    label_en: str
    label_ko: str
    source: str  # "package==version:path inside the package"
    licence: str


# (Korean, English) labels for zero-shot classification of the gallery: every
# photo's label is here, plus a few everyday distractors (horse, car, ...) that
# no photo shows, so top-1 accuracy is measured against 39 choices, not 31.
ZEROSHOT_LABELS: tuple[tuple[str, str], ...] = (
    ("우주비행사", "astronaut"),
    ("우주왕복선", "space shuttle"),
    ("사진사", "photographer"),
    ("고양이", "cat"),
    ("커피", "coffee"),
    ("동전", "coin"),
    ("은하", "galaxy"),
    ("달", "moon"),
    ("오토바이", "motorcycle"),
    ("로켓", "rocket"),
    ("망막", "retina"),
    ("사원", "temple"),
    ("꽃", "flower"),
    ("여자", "woman"),
    ("너구리", "raccoon"),
    ("계단", "stairs"),
    ("키위", "kiwi"),
    ("머그컵", "mug"),
    ("램프", "lamp"),
    ("폐허", "ruins"),
    ("도시", "city"),
    ("쿼카", "quokka"),
    ("남자", "man"),
    ("산", "mountain"),
    ("비행기", "airplane"),
    ("눈", "snow"),
    ("바위", "rock"),
    ("집", "house"),
    ("장미", "rose"),
    ("강아지", "puppy"),
    ("해변", "beach"),
    ("말", "horse"),
    ("자동차", "car"),
    ("새", "bird"),
    ("피자", "pizza"),
    ("자전거", "bicycle"),
    ("바나나", "banana"),
    ("기타", "guitar"),
    ("기차", "train"),
)


def _read_lines(name: str) -> list[str]:
    return (_DIR / name).read_text(encoding="utf-8").splitlines()


@functools.cache
def _classes(lang: str) -> tuple[str, ...]:
    names = tuple(line.strip() for line in _read_lines(f"imagenet_{lang}.txt"))
    if len(names) != NUM_CLASSES or not all(names):
        blank = [i for i, n in enumerate(names) if not n]
        raise ValueError(f"imagenet_{lang}.txt has {len(names)} lines (blank at {blank[:5]}); "
                         f"it must have {NUM_CLASSES} non-blank class names")
    return names


def imagenet_classes(lang: str = "en") -> list[str]:
    """The 1000 ImageNet-1k class names in `lang` ("en" or "ko"), indexed by class id.

    Returns a new list of 1000 strings; entry i of "ko" translates entry i of "en".
    """
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; valid languages are {LANGUAGES}")
    return list(_classes(lang))


def _parse_ranges(text: str) -> tuple[int, ...]:
    """'151-153,281' -> (151, 152, 153, 281)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last < NUM_CLASSES:
            raise ValueError(f"class range {part!r} is not within 0-{NUM_CLASSES - 1}")
        out.extend(range(first, last + 1))
    return tuple(out)


@functools.cache
def _categories() -> tuple[Category, ...]:
    lines = _read_lines("categories.tsv")
    if lines[0].split("\t") != ["ko", "en", "classes"]:
        raise ValueError(f"categories.tsv header is {lines[0]!r}; expected 'ko<TAB>en<TAB>classes'")
    cats = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"categories.tsv line {lineno} has {len(fields)} fields; expected 3")
        ko, en, ranges = fields
        cats.append(Category(ko, en, _parse_ranges(ranges)))
    return tuple(cats)


def categories() -> list[Category]:
    """Everyday parent categories (개/dog, 꽃/flower, ...) over the ImageNet classes.

    Each Category lists its member class indices in ascending order; a class may
    belong to several categories (a pickup truck is both 자동차/car and 트럭/truck).
    """
    return list(_categories())


def gallery_dir() -> Path:
    """The folder holding the gallery's JPEG files, labels.tsv and LICENSES.md."""
    return _DIR / "gallery"


@functools.cache
def _gallery() -> tuple[GalleryPhoto, ...]:
    lines = (gallery_dir() / "labels.tsv").read_text(encoding="utf-8").splitlines()
    header = ["file", "label_en", "label_ko", "source", "licence"]
    if lines[0].split("\t") != header:
        raise ValueError(f"gallery/labels.tsv header is {lines[0]!r}; expected {header}")
    photos = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"gallery/labels.tsv line {lineno} has {len(fields)} fields; "
                             f"expected {len(header)}")
        name, label_en, label_ko, source, licence = fields
        photos.append(GalleryPhoto(gallery_dir() / name, label_en, label_ko, source, licence))
    return tuple(photos)


def gallery() -> list[GalleryPhoto]:
    """The bundled photos, in the order of gallery/labels.tsv."""
    return list(_gallery())


__all__ = [
    "NUM_CLASSES", "LANGUAGES", "Category", "GalleryPhoto", "ZEROSHOT_LABELS",
    "imagenet_classes", "categories", "gallery", "gallery_dir",
]
