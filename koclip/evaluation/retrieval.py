"""Image <-> text retrieval on a caption dataset: R@K both ways, every caption counted."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from koclip.evaluation.encode import encode_images, encode_texts, subset
from koclip.evaluation.metrics import retrieval_metrics


def evaluate_retrieval(model, processor, dataset, *, ks: Sequence[int] = (1, 5, 10), limit: int = 0,
                       batch_size: int = 32, num_workers: int = 2, progress: bool = False) -> dict:
    """R@k image->text (a hit is any of the image's captions) and text->image.

    Returns {"i2t_R@k": ..., "t2i_R@k": ..., "images", "captions", "skipped"}.
    """
    ds = subset(dataset, limit)
    zimg, ok = encode_images(model, processor, ds, batch_size=batch_size, num_workers=num_workers,
                             progress=progress, desc="retrieval")
    keep = np.flatnonzero(ok)
    texts, owner = [], []
    for row, i in enumerate(keep):
        for c in ds.captions(int(i)):
            texts.append(c)
            owner.append(row)
    ztxt = encode_texts(model, processor, texts)
    owner = np.asarray(owner)
    truth = owner[None, :] == np.arange(len(keep))[:, None]
    out = retrieval_metrics(zimg[keep] @ ztxt.T, truth, ks)
    out.update(images=int(len(keep)), captions=len(texts), skipped=int((~ok).sum()))
    return out
