"""The input pipeline: datasets -> fixed-shape numpy batches, decoded ahead of the model.

Determinism: the order of epoch e is a permutation drawn from (seed, e), and
the caption used for example i in epoch e from (seed, e) too, so any step of
any epoch can be rebuilt exactly after a restart.

Fixed shapes: training drops the last partial batch; evaluation pads it.
Every batch carries `valid` (batch,) bool: False for padding and for images
that fail to decode (counted, logged, never a crash), and the losses ignore
those rows.  A thread pool decodes the next batches while the device computes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from koclip.errors import KoclipError
from koclip.images import preprocess
from koclip.prefetch import prefetched

log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def fixed_length_tokenizer(tokenizer, length: int, prefix: str = "") -> Tokenize:
    """texts -> (input_ids, attention_mask), both (n, length) int32, truncated and padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenize(texts):
        enc = tokenizer([prefix + t for t in texts], truncation=True, max_length=length, padding=False)
        ids = np.full((len(texts), length), pad, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, row in enumerate(enc["input_ids"]):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask

    return tokenize


class Batches:
    """Batches of one dataset.

    Inputs come either from decoding (`image_spec` for pixels, `tokenize` for
    tokens) or from cached features (`image_feats` (n, d) with `image_ok` (n,)
    bool; `text_feats` (u, d) with `caption_rows[i][c]` the row of caption c of
    example i).  Batches are dicts of numpy arrays with `valid` (rows,) bool and
    `pixel_values` or `image_feats`, plus `input_ids`+`attention_mask` or `text_feats`.

    `train=True`: shuffled, one caption sampled per image, partial batch dropped.
    `train=False`: dataset order, first caption, last batch padded.
    With several processes, each yields its share of the rows of every global batch.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, train: bool = True,
                 image_spec=None, tokenize: Tokenize | None = None,
                 image_feats=None, image_ok=None, text_feats=None, caption_rows=None,
                 num_workers: int = 2, prefetch: int = 4, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise KoclipError(f"global batch {batch_size} does not split over {process_count} processes")
        if (image_spec is None) == (image_feats is None):
            raise ValueError("give exactly one of image_spec and image_feats")
        if tokenize is not None and text_feats is not None:
            raise ValueError("give at most one of tokenize and text_feats (none: images only)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self.image_spec = image_spec
        self.tokenize = tokenize
        self.image_feats = image_feats
        self.image_ok = image_ok if image_ok is not None or image_feats is None else np.ones(len(dataset), bool)
        self.text_feats = text_feats
        self.caption_rows = caption_rows
        self.num_workers = max(1, num_workers)
        self.prefetch = max(1, prefetch)
        self.rows = batch_size // process_count
        self.first_row = process_index * self.rows
        self.n_captions = np.array([len(dataset.captions(i)) for i in range(len(dataset))], np.int64)
        self._lock = threading.Lock()
        self.bad_images: set[int] = set()
        n = len(dataset)
        self.steps_per_epoch = n // batch_size if train else math.ceil(n / batch_size)
        if self.steps_per_epoch == 0:
            raise KoclipError(f"{n} examples make no full batch of {batch_size}; "
                              "lower batch_size_per_device or add data")

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.train:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 0]).permutation(n)

    def caption_choice(self, epoch: int) -> np.ndarray:
        """(n,) index of the caption each example uses in `epoch`."""
        if not self.train:
            return np.zeros(len(self.dataset), np.int64)
        u = np.random.default_rng([self.seed, epoch, 1]).random(len(self.dataset))
        return np.minimum((u * self.n_captions).astype(np.int64), self.n_captions - 1)

    def batch(self, epoch: int, step: int, *, _order=None, _choice=None) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` of `epoch`."""
        order = self.order(epoch) if _order is None else _order
        choice = self.caption_choice(epoch) if _choice is None else _choice
        lo = step * self.batch_size + self.first_row
        idx = order[lo:lo + self.rows]
        valid = np.zeros(self.rows, bool)
        valid[:len(idx)] = True
        idx = np.concatenate([idx, np.zeros(self.rows - len(idx), np.int64)]).astype(np.int64)
        out: dict[str, np.ndarray] = {}
        if self.image_feats is not None:
            out["image_feats"] = np.asarray(self.image_feats[idx], np.float32)
            valid &= self.image_ok[idx]
        else:
            px = np.zeros((self.rows, self.image_spec.size, self.image_spec.size, 3), np.float32)
            for r, i in enumerate(idx):
                if valid[r]:
                    px[r], valid[r] = self._decode(int(i))
            out["pixel_values"] = px
        if self.text_feats is not None:
            rows = np.array([self.caption_rows[i][choice[i]] for i in idx], np.int64)
            out["text_feats"] = np.asarray(self.text_feats[rows], np.float32)
        elif self.tokenize is not None:
            out["input_ids"], out["attention_mask"] = self.tokenize(
                [self.dataset.captions(int(i))[choice[i]] for i in idx])
        out["valid"] = valid
        return out

    def _decode(self, i: int):
        try:
            return preprocess(self.dataset.image(i), self.image_spec)[0], True
        except (KoclipError, OSError, ValueError) as e:
            with self._lock:
                if i not in self.bad_images:
                    self.bad_images.add(i)
                    log.warning("skipping example %d: %s", i, e)
            return 0.0, False

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches `start`, `start`+1, ... of `epoch`, decoded `prefetch` batches ahead on
        `num_workers` threads; closing the iterator early cancels the rest and joins the threads."""
        build = partial(self.batch, epoch, _order=self.order(epoch), _choice=self.caption_choice(epoch))
        return prefetched(build, range(start, self.steps_per_epoch), workers=self.num_workers,
                          ahead=self.prefetch, name="koclip-data")


def split_holdout(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train indices, validation indices) for a held-out split of n examples."""
    if val_size <= 0:
        return np.arange(n), np.arange(0)
    if val_size >= n:
        raise KoclipError(f"val_size {val_size} leaves no training data out of {n} examples")
    perm = np.random.default_rng([seed, 999]).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])
