"""Make the parity fixtures for koclip.images.preprocess.

Writes tests/fixtures/images/:
  <name>.png       small generated test images of awkward sizes
  reference.npz    what transformers' CLIP and ViT image processors make of them

The processors are built locally with the documented defaults of
openai/clip-vit-base-patch32 (CLIPImageProcessor) and
google/vit-large-patch16-224 (ViTImageProcessor); nothing is downloaded.  We use
the Pillow backend of each (`...ImageProcessorPil` in transformers 5, the
"slow" processor in 4.x): it is the one that resizes uint8 images with Pillow,
as the original models were trained with.

Storage: each reference output is float32 (224, 224, 3), 600 KB raw.  After
normalisation a channel can only take as many distinct values as there were
uint8 levels, so each output is stored losslessly as uint8 codes (PNG-encoded,
key "<name>.<preset>.codes_png") plus a per-channel table of the distinct
float32 values (key "<name>.<preset>.lut", (3, 256), NaN-padded), with
ref[..., c] == lut[c][codes[..., c]] exactly (this script checks it).  That is
~35 KB per output instead of 600 KB; the test rebuilds the full float32 arrays.

Run (needs transformers, dev only):  .venv/bin/python scripts/make_image_fixtures.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images")

# name -> (width, height, mode).  Odd sizes exercise rounding of the resized
# long side and the centre-crop offset; "tiny" is upsampled; "big" is
# downsampled by > 2x (Pillow's antialiasing support widens); "rgba" checks
# that transparency is composited on white the same way (CLIP only: the ViT
# processor has no RGB conversion and rejects 4 channels).
IMAGES = {
    "wide": (301, 97, "RGB"),
    "tall": (81, 253, "RGB"),  # long side 699.65 -> 699; crop offset (699-224)//2 = 237 (odd split)
    "tiny": (7, 5, "RGB"),
    "square224": (224, 224, "RGB"),
    "big": (517, 389, "RGB"),
    "rgba": (61, 45, "RGBA"),
}


def make_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A deterministic picture with smooth gradients, sharp edges and a noisy patch."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    r = 255 * u
    g = 127.5 + 127.5 * np.sin(2 * np.pi * (3 * u + 2 * v))
    b = 255 * v
    img = np.stack([r, g, b], axis=-1)
    # Sharp-edged bars and a checkerboard: resampling filters differ most here.
    img[(x.astype(int) // max(width // 9, 1)) % 2 == 0, 0] = 30
    checker = ((x.astype(int) // 4 + y.astype(int) // 4) % 2 == 1) & (v > 0.6)
    img[checker] = [250, 240, 20]
    # A small noisy patch (kept small so the PNG stays small).
    ph, pw = max(height // 5, 1), max(width // 5, 1)
    img[:ph, -pw:] = rng.integers(0, 256, size=(ph, pw, 3))
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.clip(np.rint(255 * (0.2 + 0.8 * u) * (v < 0.8)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")
    return Image.fromarray(pixels, mode="RGB")


def processors():
    """The two reference processors, built locally (no hub)."""
    try:
        from transformers import CLIPImageProcessorPil as Clip, ViTImageProcessorPil as Vit
    except ImportError:  # transformers 4.x: the plain classes are the Pillow ones
        from transformers import CLIPImageProcessor as Clip, ViTImageProcessor as Vit
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    clip = Clip(
        do_resize=True, size={"shortest_edge": 224}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 224, "width": 224},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True)
    vit = Vit(
        do_resize=True, size={"height": 224, "width": 224}, resample=Image.Resampling.BILINEAR,
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return {"clip": clip, "vit": vit}


def encode(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (H, W, 3) -> uint8 codes (H, W, 3) and lut (3, 256) float32, lossless."""
    codes = np.empty(ref.shape, dtype=np.uint8)
    lut = np.full((3, 256), np.nan, dtype=np.float32)
    for c in range(3):
        values, index = np.unique(ref[..., c], return_inverse=True)
        assert len(values) <= 256, "more distinct values than uint8 levels"
        codes[..., c] = index.reshape(ref.shape[:2])
        lut[c, :len(values)] = values
        assert np.array_equal(lut[c][codes[..., c]], ref[..., c])
    return codes, lut


def png_bytes(codes: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> its lossless PNG encoding as a uint8 array (3-4x smaller than zlib)."""
    buf = io.BytesIO()
    Image.fromarray(codes, mode="RGB").save(buf, format="PNG", optimize=True)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def main() -> int:
    import transformers

    os.makedirs(OUT, exist_ok=True)
    procs = processors()
    arrays = {"transformers_version": np.array(transformers.__version__)}
    for seed, (name, (w, h, mode)) in enumerate(IMAGES.items()):
        im = make_image(w, h, mode, seed)
        im.save(os.path.join(OUT, f"{name}.png"), optimize=True)
        # Re-read the PNG, so the reference sees exactly the committed pixels.
        with Image.open(os.path.join(OUT, f"{name}.png")) as f:
            f.load()
            for preset, proc in procs.items():
                if preset == "vit" and mode != "RGB":
                    continue  # ViTImageProcessor does not convert to RGB; RGBA would fail there
                ref = proc(images=[f], return_tensors="np")["pixel_values"][0]
                ref = np.ascontiguousarray(ref.transpose(1, 2, 0), dtype=np.float32)  # CHW -> HWC
                codes, lut = encode(ref)
                arrays[f"{name}.{preset}.codes_png"] = png_bytes(codes)
                arrays[f"{name}.{preset}.lut"] = lut
    # Atomic write: temp file in the same directory, then rename.
    fd, tmp = tempfile.mkstemp(dir=OUT, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)  # the bulk is PNG, already compressed
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, os.path.join(OUT, "reference.npz"))
    for fn in sorted(os.listdir(OUT)):
        print(f"{fn:20s} {os.path.getsize(os.path.join(OUT, fn)):8d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
