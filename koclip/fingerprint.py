"""Fingerprints of a model: which weights, config and preprocessing made a vector.

An index stores the fingerprint of the model that built it, and refuses to be
searched or extended by a model with another one.  `koclip.load` (which
records the float32 digest before it quantises) and the Embedder both use it,
so it sits below them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np
from flax import nnx

from koclip.quantize import count_replaced

# Values sampled per variable for an index fingerprint: enough that any retraining
# or fine-tuning changes it, few enough to cost milliseconds on koclip-base.
DIGEST_SAMPLES = 64


def weights_digest(module, samples: int | None = None) -> str:
    """sha256 (hex) over a module's variables in path order: each one's path and values.

    samples=None hashes every value (exact; about a second per GB).  samples=n
    hashes each variable's shape and n strided values: it still changes when a
    model is retrained or fine-tuned, at a cost of milliseconds.
    """
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(module)), key=lambda kv: tuple(map(str, kv[0]))):
        value = np.asarray(jax.device_get(var.get_value()))
        h.update("/".join(map(str, path)).encode())
        if samples is not None:
            h.update(repr(value.shape).encode())
            flat = value.reshape(-1)
            value = flat[:: max(1, flat.size // samples)][:samples]
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def model_digest(model) -> str:
    """`weights_digest(model, DIGEST_SAMPLES)`, short.  A model that `koclip.load`
    quantised reports the digest of its float32 weights, taken before quantising
    (`model.load_info.weights`), so an index serves every precision of one model;
    any other model is digested as it is now (it may have been trained in place)."""
    info = getattr(model, "load_info", None)
    if info is not None and getattr(info, "weights", "") and count_replaced(model):
        return info.weights
    return weights_digest(model, DIGEST_SAMPLES)[:16]


def fingerprint(model, processor) -> str:
    """Hash of the model config, its weights (`model_digest`) and the image preprocessing:
    equal fingerprints, compatible vectors."""
    spec = processor.image_spec
    spec_d = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else repr(spec)
    blob = json.dumps({"config": model.config.to_hf(), "weights": model_digest(model), "preprocess": spec_d},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
