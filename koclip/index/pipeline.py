"""The embedding pipeline of a build or add: worker threads read, hash, decode and preprocess
batches of images while the calling thread runs the model, committing to the journal."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Container, Sequence

import numpy as np
from tqdm.auto import tqdm

from koclip.errors import ImageError
from koclip.images import open_image
from koclip.index.format import _normalise_rows, _Records
from koclip.index.journal import _Journal
from koclip.prefetch import prefetched


@dataclasses.dataclass
class _Batch:
    records: _Records
    pixels: np.ndarray | None
    failed: list
    dups: list


def _load_batch(embedder, files: Sequence[tuple[str, Path]], known: Container[str]) -> _Batch:
    """Read, hash, decode and preprocess one batch (runs in a worker thread).

    files: (key, absolute path).  Files whose sha256 is in `known` are not
    decoded, only listed as duplicates.
    """
    records, images, failed, dups = _Records(), [], [], []
    for key, path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            failed.append((key, f"cannot read file: {e.strerror or e}"))
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            dups.append((key, sha))
            continue
        try:
            image = open_image(data, name=key)
        except ImageError as e:
            failed.append((key, str(e)))
            continue
        records.add(key, len(data), sha, image.width, image.height)
        images.append(image)
    pixels = embedder.preprocess(images) if images else None
    return _Batch(records, pixels, failed, dups)


def _embed_files(embedder, files: list[tuple[str, Path]], journal: _Journal, *, batch_size: int,
                 num_workers: int, progress: bool, checkpoint_every: int, done: set[str],
                 known: Container[str] = frozenset()) -> tuple[int, float, float]:
    """Embed the `files` not in `done` into `journal` chunks.

    Returns (images run through the model, seconds in encode_pixels, seconds in the loop).

    Worker threads read + decode + preprocess upcoming batches while the
    calling thread runs `encode_pixels`, so the model rarely waits.  Completed
    batches are committed every `checkpoint_every` images or 30 s, and also when an
    exception (or Ctrl-C) stops the run, so resuming redoes nothing that finished.
    """
    todo = [f for f in files if f[0] not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", desc="embedding",
               disable=not progress, smoothing=0.05, dynamic_ncols=True)
    records, vectors, failed, dups = _Records(), [], [], []
    last_commit = t_start = time.monotonic()
    embedded, model_s = 0, 0.0

    def commit():
        nonlocal records, vectors, failed, dups, last_commit
        journal.commit(records, vectors, failed, dups)
        records, vectors, failed, dups = _Records(), [], [], []
        last_commit = time.monotonic()

    # Enough batches in flight that every worker is busy while the model runs.
    loaded = prefetched(lambda b: _load_batch(embedder, b, known), batches, workers=num_workers,
                        ahead=2 * max(1, num_workers), name="koclip-index-load")
    try:
        for batch in loaded:
            n = len(batch.records)
            if n:
                t = time.monotonic()
                z = np.asarray(embedder.encode_pixels(batch.pixels))
                model_s += time.monotonic() - t
                if z.shape != (n, embedder.dim):
                    raise ValueError(f"embedder {embedder.name!r} returned vectors of shape {z.shape} "
                                     f"for {n} images; expected ({n}, {embedder.dim})")
                z = _normalise_rows(z, f"embedding of {batch.records.cols['path'][0]!r} and batch")
                vectors.append(z)
                for c in _Records.COLUMNS:
                    records.cols[c].extend(batch.records.cols[c])
                embedded += n
            failed += batch.failed
            dups += batch.dups
            bar.update(n + len(batch.failed) + len(batch.dups))
            if len(records) + len(failed) + len(dups) >= checkpoint_every or time.monotonic() - last_commit > 30:
                commit()
    finally:
        loaded.close()
        commit()  # what finished is kept, even when stopping on an error
        bar.close()
    return embedded, model_s, time.monotonic() - t_start
