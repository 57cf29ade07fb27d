"""Text to patch: which part of an image best matches a text.

    ranked = rank_patches(model, processor, image, "고양이", rows=3, cols=3)
    ranked[0]                      -> PatchScore(box=(l, t, r, b), score=0.31, rank=1)
    overlay = heatmap_overlay(image, ranked)   # PIL image, best patch outlined

The image is cut into a rows x cols grid (`koclip.images.split_grid`: pixels
left over go to the last row and column); every cell is embedded as an image
of its own and scored by cosine similarity with the text.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from koclip.embedder import Embedder
from koclip.images import ImageSource, open_image, split_grid

Box = tuple[int, int, int, int]

# Colour stops of the heatmap, from the worst patch to the best: dark blue,
# teal, yellow.  Perceptually ordered and readable over most photos.
_STOPS = np.array([[33, 42, 110], [32, 145, 140], [253, 231, 37]], np.float32)
OUTLINE = (255, 40, 40)


class PatchScore(NamedTuple):
    """One cell: its `box` (left, top, right, bottom) in image pixels, cosine `score`, `rank` (1 = best)."""

    box: Box
    score: float
    rank: int


def rank_patches(model, processor, image: ImageSource, query: str | np.ndarray, rows: int,
                 cols: int) -> list[PatchScore]:
    """Scores each cell of a rows x cols grid over `image` against `query`.

    model: a KoCLIP (or anything with `config.projection_dim`, `encode_image(pixels) -> (n, d)`
        and `encode_text(ids, mask) -> (n, d)`, L2-normalised); encoded through a koclip.Embedder.
    processor: its Processor.
    image: anything `open_image` takes.
    query: the text, or its (d,) embedding when the caller has it cached.
    rows, cols: 1..8 each.
    Returns rows*cols PatchScore, best first (ranks 1..rows*cols).
    """
    cells = split_grid(open_image(image), rows, cols)
    embedder = Embedder(model, processor)
    # The Embedder encodes 9 crops as 8 + 1 (batch buckets): the model alone would pad them to 16.
    zimg = embedder.encode_images([crop for _, crop in cells])
    if isinstance(query, str):
        ztxt = embedder.encode_texts([query])[0]
    else:
        ztxt = np.asarray(query, np.float32).reshape(-1)
        if ztxt.shape[0] != zimg.shape[1]:
            raise ValueError(f"query embedding has {ztxt.shape[0]} values; the model's embeddings have "
                             f"{zimg.shape[1]}")
    scores = zimg @ ztxt
    # Stable sort: ties keep reading order (top left first).
    order = np.argsort(-scores, kind="stable")
    return [PatchScore(cells[i][0], float(scores[i]), rank) for rank, i in enumerate(order, start=1)]


def grid_positions(ranked: Sequence[PatchScore]) -> list[tuple[int, int]]:
    """(row, column) of each patch in `ranked`, 1-based, from the top left, in the same order."""
    tops = sorted({p.box[1] for p in ranked})
    lefts = sorted({p.box[0] for p in ranked})
    return [(tops.index(p.box[1]) + 1, lefts.index(p.box[0]) + 1) for p in ranked]


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB colours (shape + (3,)), along the heatmap's stops."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.minimum(v.astype(int), len(_STOPS) - 2)
    frac = (v - lo)[..., None]
    return np.rint(_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).astype(np.uint8)


def heatmap_overlay(image: ImageSource, ranked: Sequence[PatchScore], *, alpha: float = 0.45,
                    numbers: bool = True) -> Image.Image:
    """The image with each patch tinted by its score and the best patch outlined.

    image: the image `ranked` was computed on (same size).
    ranked: rank_patches' output.
    alpha: opacity of the tint, 0..1.  Scores are stretched min..max over the
        patches, so the tint shows the ranking even when cosines differ little.
    numbers: write each patch's rank in its top left corner.
    Returns a new RGB image of the same size.
    """
    base = open_image(image).convert("RGBA")
    if not ranked:
        return base.convert("RGB")
    scores = np.array([p.score for p in ranked], np.float32)
    span = float(scores.max() - scores.min())
    levels = (scores - scores.min()) / span if span > 0 else np.full_like(scores, 0.5)
    colours = colormap(levels)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    a = int(round(255 * min(max(alpha, 0.0), 1.0)))
    for p, c in zip(ranked, colours):
        left, top, right, bottom = p.box
        draw.rectangle((left, top, right - 1, bottom - 1), fill=(*map(int, c), a))
    out = Image.alpha_composite(base, layer)
    draw = ImageDraw.Draw(out)
    short = min(base.size)
    if numbers:
        font = _font(max(12, short // 18))
        for p in ranked:
            left, top = p.box[:2]
            pad = max(2, short // 100)
            draw.text((left + pad, top + pad), str(p.rank), fill=(255, 255, 255, 255), font=font,
                      stroke_width=max(1, short // 300), stroke_fill=(0, 0, 0, 255))
    best = min(ranked, key=lambda p: p.rank)
    width = max(2, short // 80)
    left, top, right, bottom = best.box
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(*OUTLINE, 255), width=width)
    return out.convert("RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


__all__ = ["PatchScore", "rank_patches", "grid_positions", "heatmap_overlay", "colormap", "OUTLINE"]
