"""Precomputed-feature mode (LiT): a locked tower's pooled outputs, computed once and cached.

When a tower is locked, its output for a given input never changes, so it is
computed once per image (or per distinct caption) and stored in an `.npz` under
the cache folder, named by a digest of the tower's config and weights, the
dataset's contents and the preprocessing.  Training then feeds these features
straight into the projection heads.  Files are written atomically.

Several processes: only process 0 looks for and writes cache files; the
others receive its features (a cache hit) or compute them with it (a miss),
so hosts need not share a disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from koclip.files import atomic_write
from koclip.fingerprint import weights_digest
from koclip.train import parallel
from koclip.train.data import Batches, Tokenize
from koclip.train.parallel import batch_sharding, replicated

log = logging.getLogger(__name__)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _run_tower(fn, state, batches, total: int, n: int, mesh, progress: bool, desc: str):
    """Runs `fn(state, **arrays)` over `batches` (dicts with `valid`); returns the first n rows."""
    outs, oks = [], []
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        arrays = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items() if k != "valid"}
        outs.append(np.asarray(parallel.to_host(fn(state, **arrays)), np.float32))
        oks.append(batch["valid"])
    return np.concatenate(outs)[:n], np.concatenate(oks)[:n]


def _cached(path: Path, names: tuple[str, ...]) -> dict | None:
    """The arrays `names` of cache file `path` as process 0 reads them, on every process;
    None when process 0 has no such file."""
    found = None
    if jax.process_index() == 0 and path.is_file():
        with np.load(path) as z:
            found = {k: z[k] for k in names}
    return parallel.arrays_from_process_0(found)


def image_features(model, dataset, spec, cache_dir, *, mesh, batch_size: int = 64, num_workers: int = 2,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, Path]:
    """Pooled image-tower outputs of every example.

    Returns (feats (n, tower_dim) float32, ok (n,) bool — False where the image
    could not be decoded, path of the cache file).
    """
    key = _key("image", model.config.vision.to_hf(), weights_digest(model.vision_model),
               dataset.fingerprint(), repr(spec), len(dataset))
    path = Path(cache_dir) / f"image-{key}.npz"
    if (hit := _cached(path, ("feats", "ok"))) is not None:
        log.info("image features from cache %s", path)
        return hit["feats"], hit["ok"], path
    graphdef, state = nnx.split(model.vision_model)
    fn = jax.jit(lambda s, pixel_values: nnx.merge(graphdef, s)(pixel_values)[1])
    state = jax.device_put(state, replicated(mesh))
    batches = Batches(dataset, batch_size, train=False, image_spec=spec, num_workers=num_workers)
    t0 = time.perf_counter()
    feats, ok = _run_tower(fn, state, batches(0), batches.steps_per_epoch, len(dataset), mesh, progress,
                           "image features")
    log.info("computed %d image features in %.1f s (%d undecodable) -> %s",
             len(feats), time.perf_counter() - t0, int((~ok).sum()), path)
    if jax.process_index() == 0:
        _save_npz(path, feats=feats, ok=ok)
    return feats, ok, path


def caption_table(dataset) -> tuple[list[str], list[np.ndarray]]:
    """Distinct captions of a dataset, and per example the row of each of its captions."""
    rows_of: dict[str, int] = {}
    rows = []
    for i in range(len(dataset)):
        rows.append(np.array([rows_of.setdefault(c, len(rows_of)) for c in dataset.captions(i)], np.int64))
    return list(rows_of), rows


def text_features(model, texts: list[str], tokenize: Tokenize, tokenizer_id: str, cache_dir, *, mesh,
                  batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, Path]:
    """Pooled text-tower outputs (len(texts), tower_dim) float32, and the cache file's path."""
    key = _key("text", model.config.text.to_hf(), weights_digest(model.text_model), tokenizer_id,
               hashlib.sha256("\n".join(texts).encode()).hexdigest())
    path = Path(cache_dir) / f"text-{key}.npz"
    if (hit := _cached(path, ("feats",))) is not None:
        log.info("text features from cache %s", path)
        return hit["feats"], path
    graphdef, state = nnx.split(model.text_model)
    fn = jax.jit(lambda s, input_ids, attention_mask: nnx.merge(graphdef, s)(input_ids, attention_mask)[1])
    state = jax.device_put(state, replicated(mesh))

    def chunks():
        for lo in range(0, len(texts), batch_size):
            chunk = list(texts[lo:lo + batch_size])
            valid = np.arange(batch_size) < len(chunk)
            ids, mask = tokenize(chunk + [""] * (batch_size - len(chunk)))  # fixed shape: one compile
            yield {"input_ids": ids, "attention_mask": mask, "valid": valid}

    feats, _ = _run_tower(fn, state, chunks(), -(-len(texts) // batch_size), len(texts), mesh, progress,
                          "text features")
    if jax.process_index() == 0:
        _save_npz(path, feats=feats)
    return feats, path
