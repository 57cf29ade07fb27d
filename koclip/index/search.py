"""An index in memory: load_index opens and checks one (format 1 or 2), Index searches it (exact,
or through the IVF when it has one), SearchResult is one hit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from koclip.errors import IndexFileError
from koclip.index import ivf as _ivf
from koclip.index.format import (
    ImageEmbedder, _commit_meta, _flat_index, _normalise_rows, _read_items, _read_meta, _read_vectors,
    _Records, _VectorsHolder, _writer_lock, check_compatible,
)
from koclip.index.segments import (
    iter_records, iter_vectors, open_segment, read_column, read_deletions, read_paths, row_group_firsts,
)

log = logging.getLogger(__name__)

_NO_ROWS = np.zeros(0, np.int64)


class SearchResult(NamedTuple):
    """One hit: `path` as stored (relative to `Index.root`), cosine `score`, `rank` (1 = best)."""

    path: str
    score: float
    rank: int


def load_index(path, embedder: ImageEmbedder | None = None, *, on_disk: bool | None = None,
               max_mapped: int | None = None) -> Index:
    """Open the index directory at `path` (format 1 or 2), checking its integrity.

    embedder: if given, its name, fingerprint and dim must match the model that
        built the index.
    on_disk: keep the vectors on disk until an exact search needs them, and search the IVF
        through memory maps of its files (resident memory well under the vectors' size);
        default: when the index holds at least ivf.ON_DISK_THRESHOLD vectors.  Otherwise the
        vectors are read (and checked) now.
    max_mapped: with on_disk, the bytes of the IVF's lists that may stay mapped into this process
        after searches before they are handed back (ivf.MappedPages); default ivf.mapped_limit:
        ivf.MAPPED_FRACTION of the IVF files' size, at least ivf.MIN_MAPPED_BYTES.
    Raises IndexFileError for a missing, truncated or corrupt index, or a model
    mismatch.  The faiss IVF files, if any, are read on the first approximate search.
    """
    path = Path(path)
    try:
        index = _load_once(path, embedder, on_disk)
    except FileNotFoundError:
        # A writer may have committed a new version and deleted these files
        # between our reading meta.json and opening them: read meta again once.
        index = None
    try:
        if index is None:
            index = _load_once(path, embedder, on_disk)
    except FileNotFoundError as e:
        raise IndexFileError(f"index {path} lacks a data file that meta.json names: {e.filename}; "
                             "the index is incomplete, rebuild it") from None
    if max_mapped is not None:
        if not isinstance(max_mapped, (int, np.integer)) or max_mapped < 0:
            raise ValueError(f"max_mapped must be a number of bytes >= 0, got {max_mapped!r}")
        index.max_mapped = int(max_mapped)
    return index


def _load_once(path: Path, embedder, on_disk) -> Index:
    """One read of meta.json and the files it names; FileNotFoundError passes through."""
    meta = _read_meta(path)
    check_compatible(meta, embedder, path)
    if meta.get("format_version", 0) >= 2:
        return _open_v2(path, meta, on_disk)
    files = meta["files"]
    try:
        items = _read_items(path / files["items"]["name"], meta["count"], files["items"])
        flat, vectors = _read_vectors(path / files["vectors"]["name"], meta["count"], meta["dim"],
                                      meta["dtype"], files["vectors"])
    except (KeyError, TypeError) as e:
        raise IndexFileError(f"{path / 'meta.json'} lacks an entry for {e}; the metadata is corrupt") from None
    except json.JSONDecodeError as e:
        raise IndexFileError(f"items file of index {path} is not valid JSON ({e})") from None
    segment = _Segment("(format 1)", 0, meta["count"], _NO_ROWS, None)
    return Index(path, meta, [segment], columns={c: items[c] for c in _Records.COLUMNS}, flat=flat,
                 vectors=vectors, on_disk=False)


def _open_v2(path: Path, meta: dict, on_disk: bool | None = None, *, lazy: bool = False) -> Index:
    """Open the format-2 index that `meta` describes (committed, or about to be: see ops).
    lazy: read nothing but the footers now, not even the paths (a writer's view of its commit)."""
    rows_of = {s["name"]: s["rows"] for s in meta["segments"]}
    dead: dict[str, np.ndarray] = {}
    for d in meta["deletions"]:
        for name, rows in read_deletions(path / d["name"], d, rows_of).items():
            dead[name] = np.concatenate([dead[name], rows]) if name in dead else rows
    for name, rows in dead.items():
        dead[name] = np.unique(rows)
        if len(dead[name]) != len(rows):
            raise IndexFileError(f"index {path}: two deletion files mark the same rows of {name}; the index "
                                 "is inconsistent, rebuild it")
    segments = [_Segment(s["name"], s["start"], s["rows"], dead.get(s["name"], _NO_ROWS),
                         open_segment(path / s["name"], s, meta)) for s in meta["segments"]]
    return Index(path, meta, segments, on_disk=on_disk, lazy=lazy)


class _Segment(NamedTuple):
    """One segment as read: its file name, first row id, row count, the rows (within it) marked
    deleted, sorted, and its open Parquet file (None for the one 'segment' of a format-1 index)."""

    name: str
    start: int
    rows: int
    dead: np.ndarray
    reader: object


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
    """An image-embedding index, open for search.

    Attributes: path, model (name), fingerprint, dim, dtype, count (live rows),
    created, root (images_root: relative paths resolve against it), format_version,
    segments (segment files), deleted (rows marked deleted, not yet compacted away),
    on_disk (see load_index), ivf_params (dict or None).  Row-aligned over the live
    rows in order: paths (list of str), sizes, sha256, widths, heights (lists), vectors
    (a read-only (count, dim) array).  Of a format-2 index only the paths are read on
    loading (and the vectors, unless on_disk); the rest on first use.
    """

    def __init__(self, path: Path, meta: dict, segments: list[_Segment], *, columns: dict | None = None,
                 flat=None, vectors: np.ndarray | None = None, on_disk: bool | None = None, lazy: bool = False):
        self.path = path
        self.meta = meta
        self.model = meta["model"]
        self.fingerprint = meta["fingerprint"]
        self.dim = meta["dim"]
        self.dtype = meta["dtype"]
        self.count = meta["count"]
        self.created = meta.get("created")
        self.format_version = meta.get("format_version", 1)
        self.root = _images_root(path, meta)
        self._segments = segments
        self.segments = len(segments) if self.format_version >= 2 else 0
        self.stored_rows = sum(s.rows for s in segments)  # row ids run from 0 to this, deleted ones too
        self._dead = np.concatenate([s.start + s.dead for s in segments]) if segments else _NO_ROWS
        self.deleted = len(self._dead)
        self.on_disk = self.count >= _ivf.ON_DISK_THRESHOLD if on_disk is None else bool(on_disk)
        self._lock = threading.RLock()
        self._columns: dict[str, list] = dict(columns or {})
        self._flat, self._vectors = flat, vectors
        self._ivf = None  # ([(faiss IVF part, start, stop)], exact tail (flat, row ids) or None)
        self.max_mapped: int | None = None  # see load_index; None: ivf.mapped_limit of the IVF files
        self.mapped_pages: _ivf.MappedPages | None = None  # set with the IVF when it is memory-mapped
        self._selector = None
        self._path_values = None
        if self.format_version >= 2 and not lazy:
            self._path_values = self._read_paths()
            if not self.on_disk:
                self._load_vectors()

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

    # ------------------------------------------------------------ columns

    @property
    def paths(self) -> list[str]:
        return self._column("path")

    @property
    def sizes(self) -> list[int]:
        return self._column("size")

    @property
    def sha256(self) -> list[str]:
        return self._column("sha256")

    @property
    def widths(self) -> list[int]:
        return self._column("width")

    @property
    def heights(self) -> list[int]:
        return self._column("height")

    @property
    def vectors(self) -> np.ndarray:
        self._load_vectors()
        return self._vectors

    def _column(self, name: str) -> list:
        with self._lock:
            if name not in self._columns:
                if name == "path":
                    values = self._path_values_()
                    self._columns[name] = values if isinstance(values, list) else values.to_pylist()
                else:
                    out = []
                    for s in self._segments:
                        out += self._live(s, read_column(s.reader, name, self.path / s.name)).to_pylist()
                    self._columns[name] = out
            return self._columns[name]

    @staticmethod
    def _live(segment: _Segment, values):
        """`values` (one per row of `segment`: an Arrow array or a list) without its deleted rows."""
        if not len(segment.dead):
            return values
        keep = np.ones(segment.rows, bool)
        keep[segment.dead] = False
        if isinstance(values, list):
            return [v for v, k in zip(values, keep) if k]
        return values.filter(keep)

    def _read_paths(self):
        import pyarrow as pa

        parts = [self._live(s, read_paths(s.reader, self.path / s.name)) for s in self._segments]
        if any(isinstance(p, list) for p in parts):
            return [x for p in parts for x in (p if isinstance(p, list) else p.to_pylist())]
        return pa.chunked_array(parts, pa.string())

    def _path_values_(self):
        """The paths as read: an Arrow array (or a list, see segments.read_paths), read on first use."""
        with self._lock:
            if self._path_values is None:
                self._path_values = self._read_paths()
            return self._path_values

    def _paths_at(self, positions: list[int]) -> list[str]:
        values = self._path_values_() if "path" not in self._columns else self._columns["path"]
        if isinstance(values, list):
            return [values[i] for i in positions]
        return values.take(positions).to_pylist() if positions else []

    # ------------------------------------------------------------ vectors and row ids

    def _load_vectors(self) -> None:
        """Read the live rows' vectors straight into an exact faiss index's storage (one copy in RAM);
        each Parquet page is checked by its CRC32 on the way."""
        with self._lock:
            if self._vectors is not None:
                return
            # Deferred: faiss loads on first use, not with koclip.index.
            import faiss

            flat = _flat_index(self.dim, self.dtype)
            nbytes = self.count * self.dim * np.dtype(self.dtype).itemsize
            if not nbytes:
                self._flat, self._vectors = flat, np.zeros((0, self.dim), self.dtype)
                return
            flat.codes.resize(nbytes)
            buf = faiss.rev_swig_ptr(flat.codes.data(), nbytes)
            array = np.asarray(_VectorsHolder(flat, buf)).view(self.dtype).reshape(self.count, self.dim)
            pos = 0
            for s in self._segments:
                for first, block in iter_vectors(s.reader, self.dim, self.dtype, self.path / s.name):
                    block = block[self._keep(s, first, len(block))]
                    array[pos:pos + len(block)] = block
                    pos += len(block)
            assert pos == self.count, (pos, self.count)
            flat.ntotal = self.count
            array.flags.writeable = False
            self._flat, self._vectors = flat, array

    @staticmethod
    def _keep(s: _Segment, first: int, n: int):
        """Which of rows first .. first + n - 1 of segment `s` are live: a slice or a boolean mask."""
        if not len(s.dead):
            return slice(None)
        dead = s.dead[(s.dead >= first) & (s.dead < first + n)] - first
        keep = np.ones(n, bool)
        keep[dead] = False
        return keep

    def _ids_of(self, positions) -> np.ndarray:
        """Live positions (0 .. count - 1) -> row ids (positions plus the deleted rows before them)."""
        positions = np.asarray(positions, np.int64)
        if not self.deleted:
            return positions
        live_before_dead = self._dead - np.arange(self.deleted)
        return positions + np.searchsorted(live_before_dead, positions, side="right")

    def _positions_of(self, ids) -> np.ndarray:
        """Row ids -> the number of live rows with smaller ids (for a live row: its live position)."""
        ids = np.asarray(ids, np.int64)
        return ids - np.searchsorted(self._dead, ids, side="left") if self.deleted else ids

    # The ivf.Rows protocol, for IVF builds: live rows by id range and by position.

    def blocks(self, start: int, stop: int):
        """(vectors (m, dim), row ids (m,)) of the live rows with ids in [start, stop), in order."""
        if self._vectors is not None:
            a, b = (int(x) for x in self._positions_of([start, stop]))
            for lo in range(a, b, 65536):
                hi = min(lo + 65536, b)
                yield self._vectors[lo:hi], self._ids_of(np.arange(lo, hi))
            return
        for s in self._segments:
            if s.start >= stop or s.start + s.rows <= start:
                continue
            firsts = row_group_firsts(s.reader)
            groups = [i for i in range(len(firsts) - 1)
                      if s.start + firsts[i] < stop and s.start + firsts[i + 1] > start]
            for first, block in iter_vectors(s.reader, self.dim, self.dtype, self.path / s.name, groups):
                ids = s.start + first + np.arange(len(block), dtype=np.int64)
                keep = self._keep(s, first, len(block))
                if isinstance(keep, slice):
                    keep = np.ones(len(block), bool)
                keep &= (ids >= start) & (ids < stop)
                yield block[keep], ids[keep]

    def take(self, positions):
        """(vectors (m, dim), row ids) of the live rows at sorted `positions`."""
        positions = np.asarray(positions, np.int64)
        ids = self._ids_of(positions)
        if self._vectors is not None:
            return self._vectors[positions], ids
        out = np.empty((len(ids), self.dim), self.dtype)
        for s in self._segments:
            lo, hi = np.searchsorted(ids, [s.start, s.start + s.rows])
            if lo == hi:
                continue
            rows = ids[lo:hi] - s.start
            firsts = row_group_firsts(s.reader)
            group_of = np.searchsorted(firsts, rows, side="right") - 1
            groups = sorted(set(group_of.tolist()))
            for first, block in iter_vectors(s.reader, self.dim, self.dtype, self.path / s.name, groups):
                sel = (rows >= first) & (rows < first + len(block))
                out[lo + np.flatnonzero(sel)] = block[rows[sel] - first]
        return out, ids

    def record_blocks(self):
        """(items {column: list} as _Records.COLUMNS, (m, dim) vectors) blocks of the live rows, in order:
        what a writer that rewrites the index (compact, upgrade) copies, one row group at a time."""
        if self.format_version < 2:
            for a in range(0, self.count, 65536):
                b = min(a + 65536, self.count)
                yield {c: self._column(c)[a:b] for c in _Records.COLUMNS}, self.vectors[a:b]
            return
        for s in self._segments:
            for first, items, vectors in iter_records(s.reader, self.dim, self.dtype, self.path / s.name):
                keep = self._keep(s, first, len(vectors))
                if not isinstance(keep, slice):
                    items = {c: [v for v, k in zip(col, keep) if k] for c, col in items.items()}
                yield items, vectors[keep]

    # ------------------------------------------------------------ search

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
            backend = "faiss" if self.ivf_params and self.count >= _ivf.FAISS_THRESHOLD else "exact"
        if backend == "faiss":
            parts, tail = self._load_ivf()
            with _one_thread_if(len(q) == 1):
                scores, ids = _ivf.search_parts([p for p, _, _ in parts], q, k,
                                                int(nprobe or self.ivf_params["nprobe"]),
                                                selector=self._live_selector(), tail=tail,
                                                pages=self._mapped_pages(parts))
            found = ids >= 0
            if found.any() and (ids[found].max() >= self.stored_rows):
                raise IndexFileError(f"the faiss files of {self.path} return row ids beyond the index's "
                                     f"{self.stored_rows} rows: they are corrupt; rebuild the index")
            positions = np.where(found, self._positions_of(np.maximum(ids, 0)), -1)
        else:
            self._load_vectors()
            with _one_thread_if(len(q) == 1):
                scores, positions = self._flat.search(q, k)
        results = []
        for row_pos, row_scores in zip(positions.tolist(), scores.tolist()):
            # faiss pads with id -1 when an IVF search finds fewer than k vectors
            hits = [(i, s) for i, s in zip(row_pos, row_scores) if i >= 0]
            paths = self._paths_at([i for i, _ in hits])
            results.append([SearchResult(p, s, rank) for rank, (p, (_, s)) in enumerate(zip(paths, hits), 1)])
        return results[0] if single else results

    def _live_selector(self):
        """A faiss IDSelector of the live row ids (a bitmap), or None when no row is deleted."""
        if not self.deleted:
            return None
        with self._lock:
            if self._selector is None:
                # Deferred: faiss loads on first use, not with koclip.index.
                import faiss

                live = np.ones(self.stored_rows, bool)
                live[self._dead] = False
                bitmap = np.packbits(live, bitorder="little")
                self._selector = (faiss.IDSelectorBitmap(self.stored_rows, faiss.swig_ptr(bitmap)), bitmap)
            return self._selector[0]

    def _mapped_pages(self, parts):
        """The MappedPages of the IVF's parts when they are memory-mapped, else None."""
        if not self.on_disk or not parts:
            return None
        with self._lock:
            if self.mapped_pages is None:
                ivfs = [p for p, _, _ in parts]
                if not _ivf.is_mapped(ivfs[0]):
                    return None
                limit = self.max_mapped
                if limit is None:
                    limit = _ivf.mapped_limit(sum(p["bytes"] for p in self.ivf_params.get("parts", ())))
                self.mapped_pages = _ivf.MappedPages(ivfs, limit)
            return self.mapped_pages

    def _load_ivf(self):
        """The IVF as ([(part, start, stop)], exact tail or None): cached, else read from disk
        (checked; memory-mapped when on_disk), else built now and saved if possible."""
        with self._lock:
            if self._ivf is not None:
                return self._ivf
            params = self.ivf_params
            if params is None:
                self._ivf = self._build_ivf()
            elif self.format_version < 2:
                entry = self.meta["files"]["ivf"]
                part = _ivf.read_part(self.path / entry["name"], entry, self.dim, on_disk=self.on_disk)
                if part.ntotal != self.count:
                    raise IndexFileError(f"faiss file {self.path / entry['name']} holds {part.ntotal} vectors, "
                                         f"the index {self.count}; rebuild the index")
                self._ivf = ([(part, 0, self.count)], None)
            else:
                try:
                    parts = [(_ivf.read_part(self.path / p["name"], p, self.dim, on_disk=self.on_disk),
                              p["start"], p["stop"]) for p in params["parts"]]
                except FileNotFoundError as e:
                    # Read on the first approximate search: a compaction since loading may have replaced it.
                    raise IndexFileError(f"faiss file {e.filename} of {self.path} is gone: another process "
                                         "rewrote the index since it was loaded; load it again") from None
                self._ivf = (parts, self._tail(params["parts"][-1]["stop"]))
            return self._ivf

    def _tail(self, covered: int):
        """(exact faiss index, row ids) over the live rows that no IVF part holds (ids >= covered)."""
        if covered >= self.stored_rows:
            return None
        flat = _flat_index(self.dim, self.dtype)
        ids = []
        for vectors, block_ids in self.blocks(covered, self.stored_rows):
            flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
            ids.append(block_ids)
        return flat, np.concatenate(ids) if ids else _NO_ROWS

    def _build_ivf(self):
        """Build an IVF over every live row now; save it into the index if no writer holds the lock
        and the index is still the one loaded (a format-1 index is read-only: it keeps it in memory)."""
        if self.format_version < 2:
            _, parts, params = _ivf.build_ivf(_ivf.ArrayRows(self.vectors), self.count, lambda ivf, a, b: ivf)
            self.meta["ivf"] = params
            log.info("built a faiss index for %s in memory; `koclip index upgrade %s` lets it be saved",
                     self.path, self.path)
            return parts, None
        try:
            with _writer_lock(self.path, "saving a faiss index", wait=0):
                meta = _read_meta(self.path)
                if (meta.get("format_version"), meta["segments"], meta["deletions"]) != (
                        2, self.meta["segments"], self.meta["deletions"]):
                    raise IndexFileError(f"{self.path} changed since it was loaded")
                meta["ivf"], parts = _ivf.write_ivf(self.path, self, self.stored_rows, on_disk=self.on_disk)
                _commit_meta(self.path, meta)
                self.meta = meta
                return parts, None
        except (OSError, IndexFileError) as e:
            log.warning("could not save a faiss index for %s (%s); building one in memory, to be rebuilt "
                        "next time", self.path, e)
            _, parts, params = _ivf.build_ivf(self, self.stored_rows, lambda ivf, a, b: ivf)
            self.meta = dict(self.meta, ivf=params)
            return parts, None
