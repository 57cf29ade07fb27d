"""An index in memory: load_index opens and checks one, Index searches it (exact, or through the
IVF when it has one), SearchResult is one hit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from koclip.errors import IndexFileError
from koclip.index.format import (
    ImageEmbedder, _commit_meta, _crc32_file, _normalise_rows, _read_items, _read_meta, _read_vectors,
    _write_data_file, _writer_lock, check_compatible,
)
from koclip.index.ivf import FAISS_THRESHOLD, _build_ivf

log = logging.getLogger(__name__)


class SearchResult(NamedTuple):
    """One hit: `path` as stored (relative to `Index.root`), cosine `score`, `rank` (1 = best)."""

    path: str
    score: float
    rank: int


def load_index(path, embedder: ImageEmbedder | None = None) -> Index:
    """Open the index directory at `path`, checking its integrity.

    embedder: if given, its name, fingerprint and dim must match the model that
        built the index.
    Raises IndexFileError for a missing, truncated or corrupt index, or a model
    mismatch.  The faiss IVF file, if any, is read on the first approximate search.
    """
    path = Path(path)
    try:
        return _load_once(path, embedder)
    except FileNotFoundError:
        # A writer may have committed a new version and deleted these files
        # between our reading meta.json and opening them: read meta again once.
        pass
    try:
        return _load_once(path, embedder)
    except FileNotFoundError as e:
        raise IndexFileError(f"index {path} lacks a data file that meta.json names: {e.filename}; "
                             "the index is incomplete, rebuild it") from None


def _load_once(path: Path, embedder) -> Index:
    """One read of meta.json and the files it names; FileNotFoundError passes through."""
    meta = _read_meta(path)
    check_compatible(meta, embedder, path)
    files = meta["files"]
    try:
        items = _read_items(path / files["items"]["name"], meta["count"], files["items"])
        flat, vectors = _read_vectors(path / files["vectors"]["name"], meta["count"], meta["dim"],
                                      meta["dtype"], files["vectors"])
        return Index(path, meta, items, flat, vectors)
    except (KeyError, TypeError) as e:
        raise IndexFileError(f"{path / 'meta.json'} lacks an entry for {e}; the metadata is corrupt") from None
    except json.JSONDecodeError as e:
        raise IndexFileError(f"items file of index {path} is not valid JSON ({e})") from None


@contextlib.contextmanager
def _one_thread_if(condition: bool):
    """Run faiss on one OpenMP thread inside the block, when `condition`.

    For a single query, splitting the scan over threads lost more than it
    gained on a busy 2-core machine (1M x 512 fp16: 80 ms on one thread,
    105-150 ms on two).  OpenMP's thread count is per calling thread, so this
    does not affect searches running in other threads.
    """
    if not condition:
        yield
        return
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _relative_root(out: Path, images_root) -> str | None:
    """`images_root` relative to the index directory `out`, '/'-separated; None when
    there is no relative path (another drive on Windows)."""
    try:
        return Path(os.path.relpath(Path(images_root).absolute(), Path(out).absolute())).as_posix()
    except ValueError:
        return None


def _images_root(path: Path, meta: dict) -> Path:
    """The folder an index's relative paths resolve against: the one at the recorded
    place relative to the index when it exists, else the recorded absolute path."""
    relative = meta.get("images_root_relative")
    if relative is not None:
        moved = Path(os.path.normpath(Path(path).absolute() / relative))
        if moved.is_dir():
            return moved
    return Path(meta["images_root"])


class Index:
    """An image-embedding index in memory.

    Attributes: path, model (name), fingerprint, dim, dtype, count, created,
    root (images_root: relative paths resolve against it), paths (list of
    str), sizes, sha256, widths, heights (lists, row-aligned), vectors (a
    read-only (count, dim) array), ivf_params (dict or None).
    """

    def __init__(self, path: Path, meta: dict, items: dict, flat, vectors: np.ndarray):
        self.path = path
        self.meta = meta
        self.model = meta["model"]
        self.fingerprint = meta["fingerprint"]
        self.dim = meta["dim"]
        self.dtype = meta["dtype"]
        self.count = meta["count"]
        self.created = meta.get("created")
        self.root = _images_root(path, meta)
        self.paths: list[str] = items["path"]
        self.sizes: list[int] = items["size"]
        self.sha256: list[str] = items["sha256"]
        self.widths: list[int] = items["width"]
        self.heights: list[int] = items["height"]
        self.vectors = vectors
        self._flat = flat
        self._ivf = None

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, model={self.model!r}, count={self.count}, dim={self.dim}, "
                f"dtype={self.dtype}, ivf={'yes' if self.ivf_params else 'no'})")

    @property
    def ivf_params(self) -> dict | None:
        return self.meta.get("ivf")

    def full_path(self, path: str) -> Path:
        """A stored path -> the image file's path (absolute paths are stored as they are)."""
        return self.root / path

    def search(self, queries, k: int = 10, *, backend: str = "auto", nprobe: int | None = None):
        """Top-k images by cosine similarity to each query.

        queries: (dim,) -> a list of k SearchResult; (m, dim) -> m such lists.
            Queries are L2-normalised here, so any scale works.
        k: results per query (fewer if the index is smaller).
        backend: "exact" (brute force over every vector, scores accumulated in
            float32), "faiss" (the IVF index; built, and saved when possible, if
            missing), or "auto" (faiss when the index has an IVF and at least
            FAISS_THRESHOLD vectors, else exact).
        nprobe: IVF lists to visit (faiss only); default: the calibrated value in ivf_params.
        """
        if backend not in ("auto", "exact", "faiss"):
            raise ValueError(f"backend must be 'auto', 'exact' or 'faiss', got {backend!r}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = q[None] if single else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape ({self.dim},) or (m, {self.dim}) for this index, "
                             f"got {np.shape(queries)}")
        q = np.ascontiguousarray(_normalise_rows(q, "query"))
        k = min(int(k), self.count)
        if k == 0:
            results = [[] for _ in q]
            return results[0] if single else results
        if backend == "auto":
            backend = "faiss" if self.ivf_params and self.count >= FAISS_THRESHOLD else "exact"
        engine = self._load_ivf() if backend == "faiss" else self._flat
        if backend == "faiss":
            engine.nprobe = int(nprobe or self.ivf_params["nprobe"])
        with _one_thread_if(len(q) == 1):
            scores, ids = engine.search(q, k)
        results = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            # faiss pads with id -1 when an IVF search finds fewer than k vectors
            hits = [(i, s) for i, s in zip(row_ids, row_scores) if i >= 0]
            results.append([SearchResult(self.paths[i], s, rank) for rank, (i, s) in enumerate(hits, 1)])
        return results[0] if single else results

    def _load_ivf(self):
        """The IVF index: cached, else read from disk (checked), else built now and saved if possible."""
        if self._ivf is not None:
            return self._ivf
        # Deferred: faiss loads on first use, not with koclip.index.
        import faiss

        entry = self.meta["files"].get("ivf")
        if entry:
            p = self.path / entry["name"]
            if p.stat().st_size != entry["bytes"] or _crc32_file(p) != entry["crc32"]:
                raise IndexFileError(f"faiss file {p} is truncated or corrupt (size or crc32 differ from "
                                     "meta.json); delete the index's \"ivf\" entries or rebuild the index")
            ivf = faiss.read_index(str(p))
            if ivf.ntotal != self.count or ivf.d != self.dim:
                raise IndexFileError(f"faiss file {p} holds {ivf.ntotal} vectors of dim {ivf.d}, the index "
                                     f"{self.count} of dim {self.dim}; rebuild the index")
            self._ivf = ivf
            return ivf
        ivf, params = _build_ivf(self._flat, self.vectors)
        self._ivf = ivf
        self.meta["ivf"] = params
        try:
            with _writer_lock(self.path, "saving a faiss index", wait=0):
                meta = _read_meta(self.path)
                if meta["files"]["vectors"] == self.meta["files"]["vectors"]:
                    meta["files"]["ivf"] = _write_data_file(self.path, "ivf", ".faiss",
                                                            lambda p: faiss.write_index(ivf, str(p)))
                    meta["ivf"] = params
                    _commit_meta(self.path, meta)
                    self.meta = meta
        except (OSError, IndexFileError) as e:
            log.warning("built a faiss index for %s but could not save it (%s); it will be rebuilt "
                        "next time", self.path, e)
        return ivf
