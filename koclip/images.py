"""Reading images safely, preprocessing them for a tower, and cutting them into grids.

- `open_image(source)` turns a path, bytes, a binary file or a PIL image into an
  8-bit RGB `PIL.Image`, or raises `ImageError` saying what is wrong.
- `ImagePreprocess` describes a tower's preprocessing as data; `CLIP` and `VIT`
  reproduce the `transformers` processors of openai/clip-vit-base-patch32 and
  google/vit-large-patch16-224, `SIGLIP` SigLIP's, and `PRESETS` maps names to specs.
- `preprocess(images, spec)` gives the float32 NHWC batch a tower takes.
- `split_grid(image, rows, cols)` cuts an image into boxes for patch search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import warnings
from typing import BinaryIO, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from koclip.errors import ImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# Formats we let Pillow decode.  Everything else (EPS runs Ghostscript, and
# dozens of rarely used plugins) is refused: less parser surface for uploads.
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
Image.init()
_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
_VALID = "JPEG, PNG, GIF, WebP, BMP, TIFF" + (" or AVIF" if "AVIF" in _FORMATS else "")

_ORIENTATION = ExifTags.Base.Orientation
_QUIET_LOCK = threading.Lock()
_WARN_ON_LOAD = frozenset({"TIFF"})

# Leading bytes of common non-image files, to say what an upload really is.
_NOT_IMAGES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"{", "JSON or other text"),
    (b"[", "JSON or other text"),
)


def _describe(source, name: str | None) -> str:
    """A short human name for `source`, used in every error message."""
    if name:
        return repr(name)
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, str):
        return repr(file_name)
    return f"<{type(source).__name__}>"


def _sniff(head: bytes) -> str:
    """Guess what a file that Pillow cannot read is, from its first bytes."""
    if not head:
        return "it is empty (0 bytes)"
    stripped = head.lstrip()
    low = stripped[:256].lower()
    if low.startswith(b"<svg") or (low.startswith(b"<?xml") and b"<svg" in low):
        return "it is an SVG vector drawing, which has no pixels to read"
    if low.startswith(b"<"):
        return "it looks like an HTML/XML page, not an image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return "it is a HEIC/HEIF photo, which is not supported (convert it to JPEG or PNG)"
    for magic, what in _NOT_IMAGES:
        if stripped.startswith(magic):
            return f"it looks like {what}, not an image"
    return "it is not an image in a supported format"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if im.has_transparency_data:
        # Premultiplied "La" has no direct route to RGBA in Pillow.
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            return _grey(a, lambda b: _stretch(b.astype(np.float64), lo, hi))
        # 16-bit data: scale 0..65535 onto 0..255 (x/257, rounded) instead of
        # letting Pillow clip everything above 255 to white.
        return _grey(a, lambda b: (b.astype(np.int64) + 128) // 257)
    if mode == "F":
        a = np.asarray(im)

        def finite(b):  # NaN and +-inf read as 0
            b = b.astype(np.float64)
            b[~np.isfinite(b)] = 0.0
            return b

        lo, hi = np.inf, -np.inf
        for b in _blocks(a):
            b = finite(b)
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
        if lo >= 0.0 and hi <= 1.0:
            return _grey(a, lambda b: np.rint(finite(b) * 255.0))
        return _grey(a, lambda b: _stretch(finite(b), lo, hi))
    return im.convert("RGB")


# Grey levels are converted this many pixels at a time: a float64 copy of a whole 40-megapixel
# float TIFF (which a few hundred bytes can declare) would be 320 MB per step.
_BLOCK = 1 << 20


def _blocks(a: np.ndarray):
    flat = a.reshape(-1)
    return (flat[i:i + _BLOCK] for i in range(0, flat.size, _BLOCK))


def _grey(a: np.ndarray, levels) -> Image.Image:
    """RGB from a 2-D array, levels(block) giving each block's 0..255 values."""
    out = np.empty(a.size, np.uint8)
    for i, b in enumerate(_blocks(a)):
        out[i * _BLOCK:i * _BLOCK + b.size] = levels(b)
    return Image.fromarray(out.reshape(a.shape)).convert("RGB")


def _stretch(b: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi (an image's min..max, data with no fixed range) linearly onto 0..255."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((b - lo) * scale)


def open_image(source: ImageSource, *, max_pixels: int = 40_000_000,
               name: str | None = None) -> Image.Image:
    """Read an image and return it as a fully loaded 8-bit RGB `PIL.Image`.

    source: a file path, the file's bytes, a binary file object, or a PIL image.
    max_pixels: width*height above which the image is refused, checked from the
        header before any pixel data is decoded (decompression bombs).
    name: what to call the image in error messages (e.g. an upload's file
        name); defaults to the path or "<N bytes>".

    EXIF orientation is applied; transparency is composited on white; grey,
    palette, CMYK, 16-bit and float images become 8-bit RGB; an animated GIF
    or WebP gives its first frame.  Raises `ImageError` for non-images,
    unsupported formats, truncated or corrupt files and oversized images.
    """
    what = _describe(source, name)
    if isinstance(source, Image.Image):
        return _finish(source, what, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return _decode(f, what, max_pixels)
        except FileNotFoundError:
            raise ImageError(f"image file {what} does not exist") from None
        except IsADirectoryError:
            raise ImageError(f"image path {what} is a directory, not an image file") from None
        except PermissionError:
            raise ImageError(f"image file {what} cannot be read (permission denied)") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), what, max_pixels)
    if hasattr(source, "read"):
        return _decode(source, what, max_pixels)
    raise TypeError(
        f"open_image takes a path, bytes, a binary file or a PIL image, not {type(source).__name__}")


def _decode(f: BinaryIO, what: str, max_pixels: int) -> Image.Image:
    """Open `f` with Pillow, check its size, decode frame 0, normalise it."""
    try:
        if not f.seekable():  # Pillow needs to seek; e.g. a socket or pipe
            f = io.BytesIO(f.read())
        start = f.tell()
        head = f.read(64)
        f.seek(start)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read image {what}: {e}") from None
    if not isinstance(head, bytes):
        raise TypeError(f"open_image needs a file opened in binary mode ('rb'), got text from {what}")
    try:
        with _quiet():
            im = Image.open(f, formats=_FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses images over 2x its own limit before we see the size.
        raise ImageError(
            f"image {what} is far too large (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
            f"limit {max_pixels:,}); this looks like a decompression bomb. "
            "Downscale it before uploading.") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"cannot read image {what}: {_sniff(head)}; valid formats are {_VALID}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on bad bytes
        raise ImageError(f"cannot read image {what}: the header is corrupt ({type(e).__name__}: {e})") from None
    return _finish(im, what, max_pixels)


def _finish(im: Image.Image, what: str, max_pixels: int) -> Image.Image:
    """Size check, load frame 0, apply EXIF orientation, convert to RGB."""
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(
            f"image {what} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it (e.g. to at most {int(max_pixels ** 0.5):,} pixels a side)")
    if width == 0 or height == 0:
        raise ImageError(f"image {what} has no pixels ({width}x{height})")
    try:
        # Only TIFF warns while decoding (it reads EXIF tags at the end);
        # other decoders run outside the lock so threads can decode in parallel.
        with _quiet() if im.format in _WARN_ON_LOAD else contextlib.nullcontext():
            if im.tell() != 0:  # (not n_frames: for TIFF it parses every page)
                im.seek(0)
            im.load()
    except Image.DecompressionBombError:
        raise ImageError(f"image {what} is too large to decode safely (limit {max_pixels:,} pixels)") from None
    except MemoryError:
        raise ImageError(f"image {what} is too large to decode in the memory available") from None
    except Exception as e:  # noqa: BLE001 - any failure here comes from the file's bytes
        raise ImageError(
            f"cannot decode image {what}: the file is truncated or corrupt ({e}); "
            "re-save or re-download it") from None
    with _quiet():
        try:
            if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
                im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not make a readable image unreadable
            pass
        try:
            return _to_rgb(im)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot convert image {what} (mode {im.mode}) to RGB: {e}") from None


@contextlib.contextmanager
def _quiet():
    """Silence warnings around the Pillow calls that emit them (bomb sizes,
    corrupt EXIF/TIFF tags, palette transparency); they would only clutter the
    app's log, and real problems are raised as ImageError instead.

    catch_warnings swaps process-wide state, so two threads interleaving their
    enter/exit could leave warnings switched off for good; the lock prevents
    that.
    """
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How a tower wants its pixels.

    size: side of the square the tower takes.
    resize: "shortest" scales the shorter side to `resize_size` keeping the
        aspect ratio (then `crop` must be True); "exact" scales to size x size.
    crop: centre-crop size x size after resizing.
    resample: Pillow filter name: nearest, bilinear, bicubic, lanczos, box, hamming.
    mean, std: per-channel RGB statistics for pixels rescaled to [0, 1].
    resize_size: target of the shorter side for "shortest" (e.g. 256 for the
        classic ImageNet resize-256-crop-224); None means `size`.
    """

    size: int
    resize: str
    crop: bool
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.resize not in ("shortest", "exact"):
            raise ValueError(f"resize must be 'shortest' or 'exact', got {self.resize!r}")
        if self.resize == "shortest" and not self.crop:
            raise ValueError("resize='shortest' keeps the aspect ratio, so crop must be True "
                             "to give size x size; use resize='exact' to skip the crop")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if len(value) != 3:
                raise ValueError(f"{field} needs 3 values (R, G, B), got {value!r}")
            object.__setattr__(self, field, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std!r}")
        if self.resize_size is not None and (not isinstance(self.resize_size, int)
                                             or self.resize_size < self.size):
            raise ValueError(f"resize_size must be an int >= size ({self.size}), got {self.resize_size!r}")


# transformers.CLIPImageProcessor defaults (openai/clip-vit-base-patch32).
CLIP = ImagePreprocess(
    size=224, resize="shortest", crop=True, resample="bicubic",
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))

# transformers.ViTImageProcessor as configured for google/vit-large-patch16-224.
VIT = ImagePreprocess(
    size=224, resize="exact", crop=False, resample="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# EfficientNet-Lite's TF evaluation preprocessing (koclip-mini).
# The TF lite builder normalises 0..255 pixels with mean 127 and std 128
# ("inception-style" so that quantised models see a symmetric range); on
# 0..1 pixels that is mean 127/255 and std 128/255.  Evaluation crops the
# centre 224/(224+32) of the shorter side and resizes it bicubically to 224;
# resizing the shorter side to 256 and then cropping 224 frames the same
# square (TF crops first, so the resampling differs slightly).
# Source: tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder.py (MEAN_RGB, STDDEV_RGB) and preprocessing.py
# (CROP_PADDING = 32, bicubic resize).
IMAGENET_LITE0 = ImagePreprocess(
    size=224, resize="shortest", crop=True, resample="bicubic",
    mean=(127.0 / 255.0,) * 3, std=(128.0 / 255.0,) * 3, resize_size=256)

# transformers' SiglipImageProcessorPil (SigLIP, SigLIP 2 fixed-resolution): bicubic resize to size x size
# (no crop), rescale 1/255, mean = std = 0.5; the size is the vision tower's image_size.  transformers 5.24's
# SiglipImageProcessor (what AutoImageProcessor picks when torchvision is installed) resizes tensors with
# torchvision's antialiased bicubic instead, which rounds some pixels differently.
SIGLIP = ImagePreprocess(
    size=224, resize="exact", crop=False, resample="bicubic",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

PRESETS: dict[str, ImagePreprocess] = {"clip": CLIP, "vit": VIT, "imagenet-lite0": IMAGENET_LITE0,
                                       "siglip": SIGLIP}


def _resize_shape(width: int, height: int, spec: ImagePreprocess) -> tuple[int, int]:
    """(width, height) after resizing, rounded the way transformers rounds."""
    if spec.resize == "exact":
        return spec.size, spec.size
    target = spec.resize_size or spec.size
    # The long side is truncated (int), not rounded, as in transformers'
    # get_resize_output_image_size; rounding would change some widths by 1 px.
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (target, new_long) if width <= height else (new_long, target)


# Above this many pixels, a "shortest" resize makes only the centre crop it keeps (see below).
_MAX_RESIZED_PIXELS = 4_000_000


def _preprocess_one(im: Image.Image, spec: ImagePreprocess) -> np.ndarray:
    """One RGB image -> (size, size, 3) uint8 after resize and centre crop."""
    new_w, new_h = _resize_shape(im.width, im.height, spec)
    resample = _RESAMPLE[spec.resample]
    top = (new_h - spec.size) // 2
    left = (new_w - spec.size) // 2
    if spec.crop and new_w * new_h > _MAX_RESIZED_PIXELS:
        # A long, thin image (say 8 x 655,360 pixels, a few hundred bytes as a TIFF) would resize
        # to billions of pixels to keep 224 x 224 of them: resample only the region of the source
        # the crop covers.  Pillow's box resampling rounds a little differently (a few levels in
        # some pixels), so ordinary shapes keep the full resize that transformers does.
        sx, sy = im.width / new_w, im.height / new_h
        box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
        return np.asarray(im.resize((spec.size, spec.size), resample=resample, box=box))
    # Resampling runs on the uint8 image with Pillow, as transformers does:
    # resampling float pixels instead gives differences of up to ~1/255.
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), resample=resample)
    a = np.asarray(im)
    if spec.crop:
        a = a[top:top + spec.size, left:left + spec.size]
    return a


def preprocess(images: ImageSource | Sequence[ImageSource], spec: ImagePreprocess | str) -> np.ndarray:
    """Images -> float32 batch of shape (n, size, size, 3), channels last.

    images: one image or a sequence; each item is anything `open_image` takes.
    spec: an `ImagePreprocess` or a name in `PRESETS` ("clip", "vit", ...).
    Pixels are rescaled by 1/255 then normalised with spec.mean / spec.std.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown preprocessing preset {spec!r}; valid: {sorted(PRESETS)}")
        spec = PRESETS[spec]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(images, "read"):
        images = [images]
    batch = np.empty((len(images), spec.size, spec.size, 3), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    for i, source in enumerate(images):
        pixels = _preprocess_one(open_image(source), spec)
        # Same arithmetic as transformers (scale in float64, normalise in
        # float32) so the outputs agree bit for bit, not just to 1e-6.
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch[i] = (x - mean) / std
    return batch


# ---------------------------------------------------------------- grids

def split_grid(image: Image.Image, rows: int, cols: int) -> list[tuple[tuple[int, int, int, int], Image.Image]]:
    """Cut `image` into a rows x cols grid, row by row from the top left.

    Returns [((left, top, right, bottom), crop), ...] with rows*cols entries.
    Every cell is width//cols by height//rows; the pixels left over when the
    size does not divide evenly go to the last column and the last row.
    rows, cols: ints in 1..8 (ValueError otherwise); an image with fewer
    pixels than cells along a side raises ImageError.
    """
    for label, n in (("rows", rows), ("cols", cols)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 8:
            raise ValueError(f"{label} must be an int from 1 to 8, got {n!r}")
    width, height = image.size
    if width < cols or height < rows:
        raise ImageError(
            f"image of {width}x{height} pixels is too small for a {rows}x{cols} grid; "
            f"it needs at least {cols} pixels across and {rows} down")
    cell_w, cell_h = width // cols, height // rows
    cells = []
    for r in range(rows):
        top = r * cell_h
        bottom = height if r == rows - 1 else top + cell_h
        for c in range(cols):
            left = c * cell_w
            right = width if c == cols - 1 else left + cell_w
            box = (left, top, right, bottom)
            cells.append((box, image.crop(box)))
    return cells
