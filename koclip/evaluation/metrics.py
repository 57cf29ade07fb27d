"""Retrieval and classification metrics as pure functions over score matrices (numpy).

Ties count against the model: a correct item tied with a wrong one is ranked
below it, so a model that scores everything equally gets no credit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _truth_matrix(truth, shape) -> np.ndarray:
    truth = np.asarray(truth)
    if truth.ndim == 1:  # one correct item per query, by index
        if truth.shape[0] != shape[0]:
            raise ValueError(f"truth has {truth.shape[0]} entries for {shape[0]} queries")
        m = np.zeros(shape, bool)
        m[np.arange(shape[0]), truth] = True
        return m
    if truth.shape != shape:
        raise ValueError(f"truth has shape {truth.shape}, the scores {shape}")
    return truth.astype(bool)


def ranks(sim, truth) -> np.ndarray:
    """0-based rank of the best-scoring correct item of each query.

    sim: (q, n) scores, higher = more similar.  truth: (q, n) bool, or (q,)
    int index of each query's correct item.  Returns (q,) int: how many wrong
    items score at least as high as the query's best correct item.
    """
    sim = np.asarray(sim, np.float64)
    t = _truth_matrix(truth, sim.shape)
    if not t.any(axis=1).all():
        raise ValueError("every query needs at least one correct item")
    best = np.where(t, sim, -np.inf).max(axis=1, keepdims=True)
    return ((sim >= best) & ~t).sum(axis=1)


def recall_at_k(sim, truth, k: int) -> float:
    """Fraction of queries whose best correct item is among the top k.

    sim: (q, n) scores; truth: (q, n) bool or (q,) int (see `ranks`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float((ranks(sim, truth) < k).mean())


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Classification top-k accuracy.  logits: (n, classes); labels: (n,) int."""
    return recall_at_k(logits, np.asarray(labels), k)


def retrieval_metrics(sim, truth, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k both ways for an (images, texts) similarity matrix.

    truth: (images, texts) bool, True where the text describes the image.
    Keys: `i2t_R@k` (image queries, text items) and `t2i_R@k`.
    """
    sim = np.asarray(sim)
    t = _truth_matrix(truth, sim.shape)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = recall_at_k(sim, t, k)
    for k in ks:
        out[f"t2i_R@{k}"] = recall_at_k(sim.T, t.T, k)
    return out
