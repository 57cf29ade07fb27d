"""Image <-> text retrieval on a caption dataset: R@K both ways, every caption counted (or each
image's first caption only, as CLIP_benchmark's Crossmodal-3600 and XTD10 tasks do)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from koclip.evaluation.encode import encode_images, encode_texts, subset
from koclip.evaluation.metrics import retrieval_metrics

CAPTION_MODES = ("all", "first")


def evaluate_retrieval(model, processor, dataset, *, ks: Sequence[int] = (1, 5, 10), limit: int = 0,
                       batch_size: int = 32, num_workers: int = 2, progress: bool = False,
                       captions: str = "all") -> dict:
    """R@k image->text (a hit is any of the image's captions) and text->image.

    captions: "all" (every caption is a text query and item) or "first" (each image's first).
    Returns {"i2t_R@k": ..., "t2i_R@k": ..., "images", "captions", "skipped"}.
    """
    ds = subset(dataset, limit)
    zimg, ok = encode_images(model, processor, ds, batch_size=batch_size, num_workers=num_workers,
                             progress=progress, desc="retrieval")
    return score_retrieval(model, processor, ds, zimg, ok, ks=ks, captions=captions)


def score_retrieval(model, processor, dataset, zimg: np.ndarray, ok: np.ndarray, *,
                    ks: Sequence[int] = (1, 5, 10), captions: str = "all") -> dict:
    """Encodes the captions of `dataset` and scores them against its image embeddings.

    zimg: (n, d) L2-normalised, ok: (n,) bool, both from `encode_images(..., dataset)`; images
    with ok False are left out.  Returns what `evaluate_retrieval` returns.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    keep = np.flatnonzero(ok)
    texts, owner = [], []
    for row, i in enumerate(keep):
        caps = dataset.captions(int(i))
        for c in caps[:1] if captions == "first" else caps:
            texts.append(c)
            owner.append(row)
    ztxt = encode_texts(model, processor, texts)
    owner = np.asarray(owner)
    truth = owner[None, :] == np.arange(len(keep))[:, None]
    out = retrieval_metrics(zimg[keep] @ ztxt.T, truth, ks)
    out.update(images=int(len(keep)), captions=len(texts), skipped=int((~np.asarray(ok)).sum()))
    return out
