"""The approximate search backend: a faiss IVF over an index's vectors, with nprobe calibrated for
recall, and the thresholds that decide when one is built, searched and kept on disk.

An IVF is one trained (empty) faiss index and one or more parts: faiss indexes that
share its coarse quantizer, each holding the rows whose ids fall in its range.  A
build makes parts of at most PART_ROWS rows, so it never holds more than one part's
codes in memory; an add leaves them alone and later folds the rows added since into
a new part (see koclip.index.ops).  A search visits the same nprobe lists in every
part and merges the hits, which is what one IVF holding all the rows would return.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from koclip.errors import IndexFileError
from koclip.index.format import _crc32_file, _write_data_file

log = logging.getLogger(__name__)

# At and above this many vectors, backend="auto" searches the faiss IVF index,
# and writing an index builds one.  Below it exact search takes < 20 ms anyway.
FAISS_THRESHOLD = 200_000
# At and above this many vectors, load_index memory-maps the IVF's parts (faiss IO_FLAG_MMAP:
# the inverted lists stay in the file, the kernel pages in the lists a search visits) and reads
# the vectors themselves only for exact search: 1M 512-d float16 vectors are 1 GiB.
ON_DISK_THRESHOLD = 1_000_000
# Rows added since the IVF's last part are searched exactly beside it; an add folds them into a
# new part once there are more than this (64k 512-d float16 rows: ~5 ms a query to scan).
TAIL_ROWS = 65_536
# Of memory-mapped parts, the pages of the lists that searches visit stay mapped into the process
# (its resident memory) until it unmaps them.  Past this fraction of the parts' size (at least
# MIN_MAPPED_BYTES), a search hands them all back: see MappedPages.
MAPPED_FRACTION = 0.15
MIN_MAPPED_BYTES = 64 << 20
# Parts after the first are merged into one when there are more than this.
MAX_PARTS = 8
# Rows per part written by a build: its codes are what a build holds in memory (2 GiB at 512-d fp16).
PART_ROWS = 1 << 21
# Recall@10 the IVF's nprobe is calibrated to reach on sample queries, with margin.
TARGET_RECALL = 0.95
_CALIBRATION_MARGIN = 0.02
_BLOCK = 65536


class Rows(Protocol):
    """Where an IVF build reads the vectors it indexes: the live rows of an index, each with a row id.

    dim, dtype: the vectors' size and stored dtype ("float16" or "float32").
    count: live rows.
    blocks(start, stop): (vectors (m, dim) in dtype, ids (m,) int64) for the live rows whose ids lie
        in [start, stop), in id order, a block at a time.
    take(positions): (m, dim) vectors of the live rows at sorted positions (0 .. count - 1) and their ids.
    """

    dim: int
    dtype: str
    count: int

    def blocks(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class ArrayRows:
    """Rows backed by an in-memory (n, dim) array whose row ids are its row numbers."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.count, self.dim = vectors.shape
        self.dtype = str(vectors.dtype)

    def blocks(self, start, stop):
        for a in range(start, min(stop, self.count), _BLOCK):
            b = min(a + _BLOCK, stop, self.count)
            yield self.vectors[a:b], np.arange(a, b, dtype=np.int64)

    def take(self, positions):
        return self.vectors[positions], np.asarray(positions, np.int64)


def default_nlist(n: int) -> int:
    """IVF list count: the power of two nearest 2*sqrt(n), at least 1 and at most n // 39
    (faiss wants >= 39 training points per list)."""
    target = 2 * np.sqrt(max(n, 1))
    nlist = 1 << int(round(np.log2(target)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return max(1, nlist)


def _train(rows: Rows, nlist: int, rng: np.random.Generator, seed: int):
    """A trained, empty faiss IVF over `rows`: k-means on a sample of 40 points per list.

    IVF (not HNSW) because on 2 CPU cores HNSW took ~80 s per 100k 512-d vectors to
    build against ~15 s for IVF, for similar latency at recall 0.95.  Lists hold the
    stored vectors themselves (not residuals from their list's centroid): fp16 codes for
    float16 indexes, float32 otherwise, so an IVF score is the exact search's score.
    """
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    n = rows.count
    # 40 points per list (faiss asks for >= 39) and 15 k-means rounds: training 2048 lists
    # takes about a minute on 2 cores; more points or rounds barely change recall.
    sample, _ = rows.take(np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False)))
    train = sample.astype(np.float32)
    quantizer = faiss.IndexFlatIP(rows.dim)
    if rows.dtype == "float16":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, rows.dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False  # fp16 residuals would round differently from the stored fp16 vectors
    else:
        ivf = faiss.IndexIVFFlat(quantizer, rows.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.cp.niter = 15
    ivf.train(train)
    return ivf


def empty_like(trained):
    """A fresh, empty IVF with `trained`'s quantizer (a copy): what a part is filled into."""
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    ivf = faiss.clone_index(trained)
    ivf.reset()
    return ivf


def fill_part(trained, blocks: Iterable[tuple[np.ndarray, np.ndarray]], on_block=None):
    """A new part: an empty copy of `trained` holding the rows of `blocks` ((vectors, ids) pairs).
    on_block(vectors, ids) sees each block too (the build computes exact neighbours on the way)."""
    ivf = empty_like(trained)
    for vectors, ids in blocks:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        ivf.add_with_ids(v, np.ascontiguousarray(ids, dtype=np.int64))
        if on_block is not None:
            on_block(v, ids)
    return ivf


class _ExactTopK:
    """The exact top-k ids (by inner product) of a few queries over rows seen block by block."""

    def __init__(self, queries: np.ndarray, k: int):
        # Deferred: faiss loads on first use, not with koclip.index.
        import faiss

        self.q = queries
        self.k = k
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=True)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        scores = self.q @ vectors.T
        kk = min(self.k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        self.heap.add_result(np.ascontiguousarray(np.take_along_axis(scores, top, 1)),
                             np.ascontiguousarray(np.asarray(ids, np.int64)[top]))

    def ids(self) -> np.ndarray:
        self.heap.finalize()
        return self.heap.I


class MappedPages:
    """Bounds the pages of memory-mapped IVF parts that stay mapped into this process.

    A search of a part read with faiss.IO_FLAG_MMAP touches the pages of the lists it visits, and
    they count in the process's resident memory until it unmaps them: after a few hundred queries
    spread over a collection, nearly the whole file.  This counts the pages of each list the first
    time a search visits it (its codes and ids in every part, by the kernel's fault-around windows) and, once more than `limit`
    bytes are counted, releases every part's mapping with madvise(MADV_DONTNEED).  The kernel keeps
    the file's pages in its page cache while memory allows, so the next searches map them again
    without reading the disk (a minor fault a page); what stays resident is at most `limit` plus
    one search's lists.  The mapping stays valid: a search running meanwhile faults its pages back in.

    parts: faiss IVFs read with IO_FLAG_MMAP, sharing one quantizer (nlist lists each).
    Attributes: limit, mapped (bytes counted since the last release), releases (how many).
    """

    _MADV_DONTNEED = 4  # Linux's value; where madvise is missing, nothing is released (logged once)

    def __init__(self, parts, limit: int):
        # Deferred: faiss loads on first use, not with koclip.index.
        import faiss

        self.limit = int(limit)
        self.mapped = 0
        self.releases = 0
        self._lock = threading.Lock()
        self._regions = []
        # A fault on a file mapping maps the cached pages around it too (Linux's fault-around:
        # the aligned 64 KiB about the page), so a list counts the windows its ranges touch.
        page = max(mmap.PAGESIZE, _FAULT_AROUND)
        nlist = parts[0].nlist
        self._list_bytes = np.zeros(nlist, np.int64)
        for part in parts:
            lists = faiss.downcast_InvertedLists(part.invlists)
            self._regions.append((int(lists.ptr), int(lists.totsize)))
            entries = [lists.lists.at(i) for i in range(nlist)]
            offset = np.array([e.offset for e in entries], np.int64)
            size = np.array([e.size for e in entries], np.int64)
            capacity = np.array([e.capacity for e in entries], np.int64)
            ids = offset + capacity * lists.code_size  # each list's slot holds its codes, then its ids
            self._list_bytes += np.where(size > 0, _pages(offset, size * lists.code_size, page)
                                         + _pages(ids, size * 8, page), 0) * page
        self._seen = np.zeros(nlist, bool)
        self._madvise = _libc_madvise()

    def visited(self, lists: np.ndarray) -> None:
        """Count the lists a search visited ((m, nprobe) list numbers, -1 for none), releasing
        every mapping once the count passes the limit."""
        lists = np.unique(lists[lists >= 0])
        with self._lock:
            new = lists[~self._seen[lists]]
            self._seen[new] = True
            self.mapped += int(self._list_bytes[new].sum())
            if self.mapped > self.limit:
                self.release()

    def release(self) -> None:
        """Unmap every page of the parts from this process (they stay in the page cache)."""
        if self._madvise is not None:
            for address, size in self._regions:
                if self._madvise(address, size, self._MADV_DONTNEED) != 0:
                    log.warning("madvise of an IVF file's mapping failed (errno %d): its pages stay "
                                "mapped", ctypes.get_errno())
                    self._madvise = None
                    break
        self._seen[:] = False
        self.mapped = 0
        self.releases += 1


_FAULT_AROUND = 64 << 10


def _pages(start: np.ndarray, length: np.ndarray, page: int) -> np.ndarray:
    """How many pages the byte ranges [start, start + length) touch (length > 0)."""
    return (start + length + page - 1) // page - start // page


@functools.cache
def _libc_madvise():
    if not sys.platform.startswith("linux"):
        log.info("IVF file mappings are not released on %s: the kernel pages them out under memory "
                 "pressure", sys.platform)
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def is_mapped(ivf) -> bool:
    """Whether a faiss IVF's lists are memory-mapped from its file (read with IO_FLAG_MMAP)."""
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def mapped_limit(parts_bytes: int) -> int:
    """The default MappedPages limit for memory-mapped parts of `parts_bytes` bytes in all."""
    return max(MIN_MAPPED_BYTES, int(MAPPED_FRACTION * parts_bytes))


def search_parts(parts, q: np.ndarray, k: int, nprobe: int, *, selector=None, tail=None,
                 pages: MappedPages | None = None):
    """Search every part of an IVF (and an exact `tail`) and merge: -> (scores (m, k), ids (m, k)),
    ids -1 where fewer than k rows were found.

    parts: faiss IVFs sharing one quantizer.  selector: a faiss IDSelector of the ids that may
    be returned (the live rows), or None for all.  tail: (faiss flat index, its rows' ids) or None.
    pages: the parts' MappedPages when they are memory-mapped: told which lists were visited.
    """
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    scores, ids = [], []
    if parts:
        # The parts' quantizers are copies of one: assign the queries to lists once, for all of them
        # (faiss's Python search_preassigned takes no params, so its C entry point is called).
        nprobe = min(int(nprobe), parts[0].nlist)
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            params.sel = selector
        q = np.ascontiguousarray(q, dtype=np.float32)
        list_scores, lists = parts[0].quantizer.search(q, nprobe)
    for part in parts:
        d = np.empty((len(q), k), np.float32)
        i = np.empty((len(q), k), np.int64)
        part.search_preassigned_c(len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(lists), faiss.swig_ptr(list_scores),
                                  faiss.swig_ptr(d), faiss.swig_ptr(i), False, params)
        scores.append(d)
        ids.append(i)
    if parts and pages is not None:
        pages.visited(lists)
    if tail is not None and tail[0].ntotal:
        flat, tail_ids = tail
        d, i = flat.search(q, min(k, flat.ntotal))
        scores.append(d)
        ids.append(np.where(i >= 0, tail_ids[np.maximum(i, 0)], -1))
    d = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    d = np.where(i >= 0, d, -np.inf)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def build_ivf(rows: Rows, stop: int, save_part, *, nlist: int | None = None, trained=None,
              target_recall: float = TARGET_RECALL, seed: int = 0, calibration_queries: int = 200,
              part_rows: int | None = None):
    """Train (unless `trained` is given) and fill a faiss IVF over the live rows with ids below
    `stop`, part by part, then calibrate nprobe.

    save_part(ivf, start, stop) -> what to search that part with: the in-memory part, or the
        file it was written to, memory-mapped.  Each part is dropped from memory once saved.
    nprobe is the smallest on a ~1.4x ladder whose recall@10, on `calibration_queries`
    stored vectors (their own row excluded), reaches target_recall + 0.02 (the margin
    because recall on fresh queries can come out a little lower: 0.951 for 0.96
    calibrated, on 1M CLIP-like vectors).
    Returns (trained IVF, [(searchable part, start, stop)], params dict for meta.json).
    """
    t0 = time.perf_counter()
    n = rows.count
    rng = np.random.default_rng(seed)
    if trained is None:
        nlist = nlist or default_nlist(n)
        trained = _train(rows, nlist, rng, seed)
    nlist = trained.nlist
    sample = np.sort(rng.choice(n, size=min(n, calibration_queries), replace=False))
    q, own = rows.take(sample)
    q = np.ascontiguousarray(q, dtype=np.float32)
    exact = _ExactTopK(q, min(11, n))
    part_rows = part_rows or PART_ROWS
    parts = []
    for a in range(0, max(stop, 1), part_rows):
        b = min(a + part_rows, stop)
        ivf = fill_part(trained, rows.blocks(a, b), exact.add)
        parts.append((save_part(ivf, a, b), a, b))
        del ivf
    truth = exact.ids()
    chosen, recall = nlist, 1.0
    for nprobe in _nprobe_ladder(nlist):
        _, got = search_parts([p for p, _, _ in parts], q, min(11, n), nprobe)
        recall = _recall_excluding(got, truth, own)
        if recall >= target_recall + _CALIBRATION_MARGIN:
            chosen = nprobe
            break
    params = {"type": "IVF-SQfp16" if rows.dtype == "float16" else "IVF-Flat", "nlist": nlist,
              "nprobe": chosen, "calibrated_recall_at_10": round(float(recall), 4),
              "trained_on": n, "seed": seed, "build_seconds": round(time.perf_counter() - t0, 2)}
    log.info("built faiss IVF index: %s", params)
    return trained, parts, params


def _nprobe_ladder(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to nlist (steps of about 1.4x)."""
    out, p = [], 1
    while p < nlist:
        out += [p, p * 3 // 2] if p >= 2 else [p]
        p *= 2
    return sorted({x for x in out if x < nlist} | {nlist})


def _recall_excluding(got: np.ndarray, truth: np.ndarray, own: np.ndarray) -> float:
    """Mean recall of `got` vs `truth` rows, ignoring each query's own row `own[i]`."""
    hits = total = 0
    for g, t, o in zip(got.tolist(), truth.tolist(), own.tolist()):
        want = [x for x in t if x != o and x >= 0][:10]
        hits += len(set(want) & set(g))
        total += len(want)
    return hits / total if total else 1.0


# ---------------------------------------------------------------- files

def _write_faiss(directory: Path, stem: str, ivf) -> dict:
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    return _write_data_file(directory, stem, ".faiss", lambda p: faiss.write_index(ivf, str(p)))


def write_ivf(directory: Path, rows: Rows, stop: int, *, on_disk: bool, trained=None, nlist: int | None = None,
              keep: dict | None = None):
    """Build an IVF over the live rows with ids below `stop` (see build_ivf) into data files of the
    index `directory`: -> (meta.json's "ivf" entry, [(searchable part, start, stop)]).

    on_disk: search the parts through memory maps of their files (else the parts built, in memory).
    trained: reuse this trained IVF (no k-means); keep: params of the IVF it came from (nprobe and
        trained_on stay, nothing is calibrated again) with its "trained" entry.
    """
    entries = []

    def save_part(ivf, a, b):
        entry = _write_faiss(directory, "ivf", ivf)
        entries.append(dict(entry, start=int(a), stop=int(b)))
        return read_part(directory / entry["name"], entries[-1], rows.dim, on_disk=True) if on_disk else ivf

    if keep is not None:
        parts = []
        for a in range(0, max(stop, 1), PART_ROWS):
            b = min(a + PART_ROWS, stop)
            parts.append((save_part(fill_part(trained, rows.blocks(a, b)), a, b), a, b))
        return dict(keep, parts=entries), parts
    trained, parts, params = build_ivf(rows, stop, save_part, nlist=nlist, trained=trained)
    return dict(params, trained=_write_faiss(directory, "trained", trained), parts=entries), parts


def add_part(directory: Path, rows: Rows, ivf_meta: dict, start: int, stop: int, *, on_disk: bool):
    """A new part holding the live rows with ids in [start, stop), filled into a copy of the IVF's
    trained index: -> (its meta.json entry, the searchable part)."""
    trained = read_trained(directory, ivf_meta)
    part = fill_part(trained, rows.blocks(start, stop))
    entry = dict(_write_faiss(directory, "ivf", part), start=int(start), stop=int(stop))
    return entry, (read_part(directory / entry["name"], entry, rows.dim, on_disk=True) if on_disk else part)


def read_trained(directory: Path, ivf_meta: dict):
    """The trained, empty IVF that an index's parts were filled into (checked)."""
    entry = ivf_meta["trained"]
    return read_part(directory / entry["name"], entry, None, on_disk=False)


def read_part(path: Path, entry: dict, dim: int | None, *, on_disk: bool):
    """A faiss file named in meta.json: checked by size, and by crc32 when read into memory; with
    on_disk, memory-mapped (faiss.IO_FLAG_MMAP: its inverted lists stay in the file, read-only)."""
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    size = path.stat().st_size  # FileNotFoundError passes: see load_index
    if size != entry["bytes"] or (not on_disk and _crc32_file(path) != entry["crc32"]):
        raise IndexFileError(f"faiss file {path} is truncated or corrupt (size or crc32 differ from "
                             "meta.json); rebuild the index")
    try:
        ivf = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if on_disk else 0)
    except RuntimeError as e:  # faiss reports a file it cannot parse as RuntimeError
        raise IndexFileError(f"faiss file {path} cannot be read ({str(e).splitlines()[0]}); rebuild the "
                             "index") from None
    if on_disk:
        # faiss's on-disk lists start 32 threads per search to page in the lists it will visit: 0.6 ms
        # a query on 2 cores, over ten times a warm search.  The search thread's own page faults do it.
        faiss.downcast_InvertedLists(ivf.invlists).prefetch_nthread = 0
    if dim is not None and ivf.d != dim:
        raise IndexFileError(f"faiss file {path} holds vectors of dim {ivf.d}, the index {dim}; rebuild the index")
    if "stop" in entry and ivf.ntotal > entry["stop"] - entry["start"]:
        raise IndexFileError(f"faiss file {path} holds {ivf.ntotal} vectors for row ids {entry['start']} to "
                             f"{entry['stop']}; rebuild the index")
    return ivf
