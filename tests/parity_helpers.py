"""What the parity tests (test_parity, test_siglip, test_clip_family) share: the committed fixtures
under tests/fixtures/parity, their reference outputs, and the bound they are held to.

Each fixture directory holds a checkpoint and golden.npz, the outputs the reference implementation
gave for it (written by scripts/make_parity_fixtures.py, make_siglip_fixtures.py and
make_clip_fixtures.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

import koclip

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
# Embeddings are L2-normalised (entries at most 1) and logits at most exp(logit_scale) ~ 15 or
# hidden states of tiny towers, so float32 parity with the reference is far inside 1e-4; a wrong
# weight mapping or a missing layer moves them by tenths.
TOL = 1e-4


def golden(name: str) -> dict[str, np.ndarray]:
    """The reference outputs of fixture `name` (e.g. "siglip_spiece", "towers/bert"), as arrays."""
    with np.load(PARITY / name / "golden.npz") as f:
        return dict(f)


@functools.cache
def loaded(name: str):
    """koclip.load of a committed fixture -> (model, processor), shared by the tests of a session
    (loading is read-only)."""
    return koclip.load(str(PARITY / name))


def max_diff(a, b) -> float:
    """Largest |a - b| over all entries, in float32; the shapes must agree."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())
