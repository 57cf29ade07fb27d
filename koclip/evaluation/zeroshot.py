"""Zero-shot classification: class names in prompt templates, ensembled, against each image.

Prompt ensembling: each class's text embedding is the mean of its L2-normalised
template embeddings, normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from koclip.evaluation.encode import encode_images, encode_texts, subset
from koclip.evaluation.metrics import topk_accuracy
from koclip.processing import KOREAN_TEMPLATES, apply_template


def ensemble(ztxt: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """(classes * templates, d) normalised embeddings, class-major -> (classes, d):
    the mean over templates, renormalised."""
    z = np.asarray(ztxt, np.float32).reshape(n_classes, n_templates, -1).mean(axis=1)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def classifier(model, processor, classnames: Sequence[str], templates: Sequence[str] = KOREAN_TEMPLATES
               ) -> np.ndarray:
    """(len(classnames), projection_dim) class embeddings, one row per class."""
    texts = [t for name in classnames for t in (apply_template([name], tpl)[0] for tpl in templates)]
    return ensemble(encode_texts(model, processor, texts), len(classnames), len(templates))


def evaluate_zeroshot(model, processor, dataset, *, templates: Sequence[str] | None = None,
                      ks: Sequence[int] = (1, 5), limit: int = 0, batch_size: int = 32, num_workers: int = 2,
                      progress: bool = False) -> dict:
    """Top-k accuracy of `model` on a ClassDataset (undecodable images are left out and counted).

    Returns {"top1", "top5", ..., "n", "skipped", "classes", "templates",
    "per_class": {name: top-1 accuracy}}.
    """
    templates = tuple(templates or dataset.templates)
    ds = subset(dataset, limit)
    weights = classifier(model, processor, ds.classnames, templates)
    zimg, ok = encode_images(model, processor, ds, batch_size=batch_size, num_workers=num_workers,
                             progress=progress, desc="zero-shot")
    out = score(zimg[ok], weights, ds.labels[ok], ds.classnames, ks)
    out.update(skipped=int((~ok).sum()), templates=list(templates))
    return out


def score(zimg: np.ndarray, weights: np.ndarray, labels, classnames: Sequence[str],
          ks: Sequence[int] = (1, 5)) -> dict:
    """Accuracy of classifying image embeddings (n, d) by class embeddings (classes, d).

    Returns {"top1", "top5", ..., "n", "classes", "per_class": {name: top-1 accuracy or None}}.
    """
    logits = np.asarray(zimg) @ np.asarray(weights).T
    labels = np.asarray(labels)
    out: dict = {f"top{k}": topk_accuracy(logits, labels, k) for k in ks if k <= len(classnames)}
    pred = logits.argmax(axis=1)
    out["per_class"] = {name: float((pred[labels == c] == c).mean()) if (labels == c).any() else None
                        for c, name in enumerate(classnames)}
    out.update(n=int(len(labels)), classes=len(classnames))
    return out
