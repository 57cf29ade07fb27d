"""Floating-point bounds for tests, derived from the arithmetic rather than read off one CPU.

Two float32 computations of the same quantity that differ only in the order
of their additions (another batch split, another device count, another
matmul blocking chosen by XLA or oneDNN for this CPU) differ by rounding
alone.  Higham's bound for a sum of n terms computed in any order is
|fl(s) - s| <= gamma_n * sum|terms|, gamma_n = n*u / (1 - n*u) ~ n*u with
u = 2**-24 the float32 unit roundoff.  A chain of `depth` such reductions
(the layers of a forward and backward pass) accumulates, to first order, at
most depth * n * u relative to the magnitudes involved.  These worst-case
bounds hold on every CPU; the errors actually seen are far below them
(they grow like sqrt(n) rather than n), while a real defect (a missing
all-reduce, a gradient averaged over the wrong count, a shard dropped)
changes a value by tens of percent, so the bounds still catch what matters.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -11  # float16 unit roundoff
UBF16 = 2.0 ** -8  # bfloat16 unit roundoff


def reduction_rtol(longest: int, depth: int = 1, u: float = U32) -> float:
    """Relative bound for `depth` chained reductions of at most `longest` terms each, in a format
    with unit roundoff `u`: depth * gamma_longest."""
    n = longest * u
    if n >= 1:
        raise ValueError(f"a reduction of {longest} terms at u={u} has no useful bound")
    return depth * n / (1 - n)


def unit_norm_atol(dim: int, u: float = U32) -> float:
    """Bound on | ||x|| - 1 | for a vector of `dim` entries normalised in a format with roundoff u:
    the squared norm sums `dim` terms (gamma_dim), the square root and the division add 2u more."""
    return reduction_rtol(dim, 1, u) + 2 * u


def assert_trees_close(a, b, rtol: float, what: str = "leaf") -> None:
    """Every leaf of `b` within rtol * (max|leaf of a| + rtol * G) of `a`, G the largest |value| in `a`.

    rtol bounds rounding relative to each leaf's own magnitude.  A leaf whose exact value cancels to
    zero (an attention key bias: softmax ignores a constant added to every key, so its gradient is
    exactly 0) holds nothing but rounding noise from terms far larger than itself; rtol**2 * G is
    its floor, orders of magnitude above that noise and below any real leaf's error.
    """
    a, b = [np.asarray(x, np.float64) for x in a], [np.asarray(x, np.float64) for x in b]
    assert len(a) == len(b), f"{len(a)} leaves against {len(b)}"
    g = max(float(np.abs(x).max()) for x in a if x.size)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what} {i}: shape {x.shape} against {y.shape}"
        if not x.size:
            continue
        bound = rtol * (float(np.abs(x).max()) + rtol * g)
        diff = float(np.abs(x - y).max())
        assert diff <= bound, f"{what} {i} {x.shape}: max |difference| {diff:.3g} > bound {bound:.3g}"
