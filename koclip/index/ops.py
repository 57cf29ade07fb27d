"""What changes an index: build_index, add_images, remove_images, merge_indexes and
write_vectors_index, each holding the index's writer lock and ending in _write_index, which
writes fresh data files and commits meta.json."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from koclip.errors import IndexFileError
from koclip.index.files import in_shard, parse_shard, scan_images
from koclip.index.format import (
    _DATA_FILE, _JOURNAL_SUFFIX, DTYPES, FORMAT, FORMAT_VERSION, ImageEmbedder, _columns, _commit_meta,
    _holds_writer_lock, _json_bytes, _normalise_rows, _now, _read_meta, _read_vectors, _Records,
    _write_data_file, _writer_lock,
)
from koclip.index.ivf import FAISS_THRESHOLD, _build_ivf
from koclip.index.journal import _Journal
from koclip.index import ray_engine
from koclip.index.pipeline import _embed_files
from koclip.index.search import Index, _relative_root, load_index

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")  # build_index's embedding stage: in this process, or on a Ray cluster


@dataclasses.dataclass
class BuildReport:
    """What build_index / add_images / merge_indexes did.

    indexed: images with a vector in the output written by this call
        (for add_images: the images added or replaced).
    count: rows in the output index.
    embedded: images run through the model in this call (the rest came from
        the journal, the existing index, or were duplicates / unreadable).
    resumed: images found already done in the journal of an earlier, killed run.
    skipped: (path, reason) for each unreadable image.
    duplicates: (path, path_kept) for files whose bytes equal an indexed file.
    seconds: wall time of the call.
    model_seconds, pipeline_seconds: time spent in encode_pixels, and in the
        embedding loop as a whole; their ratio is how busy the model was
        (below ~0.9, image loading is the bottleneck: raise num_workers).
    """

    out_path: Path
    indexed: int = 0
    count: int = 0
    embedded: int = 0
    resumed: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0
    pipeline_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0

    @property
    def model_busy(self) -> float:
        """Fraction of the embedding loop the model was computing (1.0: it never waited for images)."""
        return self.model_seconds / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0


def _record(index: Index, row: int) -> tuple:
    """Row `row` of `index`'s per-image columns, in _Records.COLUMNS order."""
    return index.paths[row], index.sizes[row], index.sha256[row], index.widths[row], index.heights[row]


def _stored_path(file: Path, root: Path) -> str:
    """How an index stores `file`: relative to its images_root when inside it, else absolute."""
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.as_posix()


def _check_target(out: Path) -> None:
    """Refuse to write an index over something that is not one (or the remains of an interrupted write)."""
    if not out.exists():
        return
    ours = lambda name: name in (".lock", "meta.json") or _DATA_FILE.match(name) or name.endswith(".tmp")
    if not out.is_dir() or not all(ours(p.name) for p in out.iterdir()):
        raise IndexFileError(f"{out} exists and is not a koclip index; choose another output path")


def _write_index(out: Path, *, model: str, fingerprint: str, dim: int, dtype: str, images_root: str,
                 items: dict, fill_vectors, count: int, created: str | None = None,
                 faiss: bool | str = "auto", ivf_from: Index | None = None, new_rows=None) -> Index:
    """Write a complete index into directory `out` (created if needed) and return it loaded.

    fill_vectors(array): fills a writable (count, dim) `dtype` array (a memory map of the new file).
    faiss: True / False / "auto" (build an IVF when count >= FAISS_THRESHOLD).
    ivf_from + new_rows: an index whose IVF to update instead of retraining:
        new_rows = (rows removed, rows added) relative to it; None retrains.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_target(out)
    if not _holds_writer_lock(out):
        raise RuntimeError(f"_write_index({out}) called without the index's writer lock")

    def write_vectors(p):
        mm = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=(count, dim))
        if count:
            fill_vectors(mm)
            mm.flush()
        del mm

    files = {
        "vectors": _write_data_file(out, "vectors", ".npy", write_vectors),
        "items": _write_data_file(out, "items", ".json", lambda p: p.write_bytes(
            _json_bytes({c: items[c] for c in _Records.COLUMNS}))),
        "ivf": None,
    }
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "fingerprint": fingerprint,
            "dim": int(dim), "dtype": dtype, "normalised": True, "count": int(count),
            "created": created or _now(), "updated": None, "images_root": str(images_root),
            "images_root_relative": _relative_root(out, images_root), "files": files, "ivf": None}
    flat, vectors = _read_vectors(out / files["vectors"]["name"], count, dim, dtype, files["vectors"])
    index = Index(out, meta, {c: items[c] for c in _Records.COLUMNS}, flat, vectors)
    if faiss is True or (faiss == "auto" and count >= FAISS_THRESHOLD):
        ivf, params = _updated_ivf(ivf_from, new_rows, index) or _build_ivf(flat, vectors)
        import faiss as _faiss  # deferred, like every faiss import here (`faiss` is the parameter)

        files["ivf"] = _write_data_file(out, "ivf", ".faiss", lambda p: _faiss.write_index(ivf, str(p)))
        meta["ivf"] = params
        index._ivf = ivf
    _commit_meta(out, meta)
    return index


def _updated_ivf(old: Index | None, new_rows, index: Index):
    """Reuse `old`'s trained IVF for `index` (old rows kept in place, some replaced, some appended),
    unless the index has grown past 4x what the IVF was trained on.  None = retrain."""
    if old is None or new_rows is None or not old.ivf_params:
        return None
    if index.count > 4 * old.ivf_params.get("trained_on", 0):
        return None
    try:
        ivf = old._load_ivf()
    except IndexFileError:
        return None
    replaced, appended = new_rows
    rows = np.asarray(sorted(set(replaced) | set(appended)), dtype=np.int64)
    if len(replaced):
        ivf.remove_ids(np.asarray(sorted(replaced), dtype=np.int64))
    if len(rows):
        ivf.add_with_ids(index.vectors[rows].astype(np.float32), rows)
    return ivf, dict(old.ivf_params)


def build_index(embedder: ImageEmbedder, images_dir, out_path, *, batch_size: int = 32, shard=None,
                progress: bool = True, num_workers: int = 2, dtype: str = "float16",
                checkpoint_every: int = 1024, faiss: bool | str = "auto",
                lock_wait: float | None = None, engine: str = "local", ray_address: str | None = None,
                ray_actors: int | None = None, on_batch=None) -> BuildReport:
    """Embed every image under `images_dir` and write the index directory `out_path`.

    Scans recursively (scan_images), in sorted order, `batch_size` images per
    model call.  `shard` ("i/n" or (i, n), 1-based) keeps only the files whose
    path hashes to shard i, so n machines build disjoint parts that together
    cover the folder; join them with merge_indexes.  Progress is journalled in
    `<out_path>.partial/` every `checkpoint_every` images: after a crash or
    Ctrl-C, the same call continues where it stopped.  Unreadable images are
    skipped and listed in the report; files with identical bytes are stored
    once (the first path in sorted order).  An existing index at `out_path`
    is replaced when the new one is complete.
    dtype: "float16" (default, half the size) or "float32".
    faiss: build the approximate IVF index: "auto" (when >= FAISS_THRESHOLD images), True, False.
    lock_wait: seconds to wait while another process writes to `out_path` (default LOCK_WAIT_SECONDS).
    engine: "local" (threads read images, this process runs the model) or "ray" (Ray Data tasks
        read them and model actors embed them on a cluster: koclip.index.ray_engine; `embedder`
        must come from koclip.load_embedder, ray_address/ray_actors choose the cluster and pool).
    on_batch(done, total): with engine "ray", called as results arrive.
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = parse_shard(shard)
    root = Path(images_dir).resolve()
    out = Path(out_path)
    _check_target(out)
    rels = scan_images(root)
    if shard:
        rels = [r for r in rels if in_shard(r, shard)]
    with _writer_lock(out, "building an index", lock_wait):
        journal = _Journal(out.with_name(out.name + _JOURNAL_SUFFIX),
                           {"kind": "build", "model": embedder.name, "fingerprint": embedder.fingerprint,
                            "dim": int(embedder.dim), "images_root": str(root),
                            "shard": list(shard) if shard else None})
        done = journal.done()
        report = BuildReport(out, resumed=len(done & set(rels)))
        files = [(r, root / r) for r in rels]
        if engine == "ray":
            stats = ray_engine.embed_files(embedder, files, journal, batch_size=batch_size, address=ray_address,
                                           actors=ray_actors, progress=progress,
                                           checkpoint_every=checkpoint_every, done=done, on_batch=on_batch)
        else:
            stats = _embed_files(embedder, files, journal, batch_size=batch_size, num_workers=num_workers,
                                 progress=progress, checkpoint_every=checkpoint_every, done=done)
        report.embedded, report.model_seconds, report.pipeline_seconds = stats
        j = journal.read()
        wanted = set(rels)
        first_of_sha = {}
        keep = []
        for rel in sorted(p for p in j["records"] if p in wanted):
            sha = j["records"][rel].sha256
            if sha in first_of_sha:
                report.duplicates.append((rel, first_of_sha[sha]))
            else:
                first_of_sha[sha] = rel
                keep.append(rel)
        report.skipped = sorted((p, r) for p, r in j["failed"].items() if p in wanted)
        index = _write_index(
            out, model=embedder.name, fingerprint=embedder.fingerprint, dim=int(embedder.dim), dtype=dtype,
            images_root=str(root), items=_items_of(keep, j["records"]), count=len(keep),
            fill_vectors=lambda mm: _fill_from_journal(mm, keep, j), faiss=faiss)
        journal.remove()
    report.indexed = report.count = index.count
    report.seconds = time.perf_counter() - t0
    _log_report("built", report)
    return report


def _items_of(keys: list[str], records: dict) -> dict:
    """Journal records of `keys` -> items columns."""
    return _columns(records[k].item(k) for k in keys)


def _fill_from_journal(mm: np.ndarray, keys: list[str], j: dict, rows=None) -> None:
    """Copy the journal vectors of `keys` into `rows` of `mm` (default 0, 1, ...), one chunk at a time."""
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for dest, k in zip(range(len(keys)) if rows is None else rows, keys):
        chunk, row = j["records"][k].chunk, j["records"][k].row
        by_chunk.setdefault(chunk, []).append((dest, row))
    for chunk, pairs in by_chunk.items():
        dest, rows = (np.asarray(x) for x in zip(*pairs))
        mm[dest] = _Journal.vectors(j["chunks"][chunk])[rows]


def _log_report(what: str, r: BuildReport) -> None:
    log.info("%s %s: %d images (%d embedded at %.1f img/s, model busy %.0f%%, %d resumed), %d unreadable, "
             "%d duplicates", what, r.out_path, r.count, r.embedded, r.images_per_second, 100 * r.model_busy,
             r.resumed, len(r.skipped), len(r.duplicates))


def add_images(index_path, embedder: ImageEmbedder, paths_or_dir, *, batch_size: int = 32,
               progress: bool = True, num_workers: int = 2, checkpoint_every: int = 1024,
               lock_wait: float | None = None) -> BuildReport:
    """Add images to an existing index: `paths_or_dir` is a file or folder, or a list of them
    (folders are scanned like build_index).

    Files inside the index's images_root are stored by relative path, others
    by absolute path.  A file whose bytes (sha256) are already in the index is
    not embedded again, only reported as a duplicate; a stored path whose file
    changed gets its vector replaced.  Like build_index, the run is journalled
    (`<index_path>.partial/`) and resumable; the index is replaced atomically.
    The index's writer lock is held from reading the index to committing it
    (lock_wait: see build_index).
    """
    t0 = time.perf_counter()
    path = Path(index_path)
    _read_meta(path)  # a missing index is an error here, not a directory the lock creates
    with _writer_lock(path, "adding images", lock_wait):
        old = load_index(path, embedder)
        report, index = _add_locked(old, embedder, paths_or_dir, batch_size=batch_size, progress=progress,
                                    num_workers=num_workers, checkpoint_every=checkpoint_every)
    report.count = index.count
    report.seconds = time.perf_counter() - t0
    _log_report("added to", report)
    return report


def _add_locked(old: Index, embedder, paths_or_dir, **embed_options) -> tuple[BuildReport, Index]:
    """add_images' work, with the writer lock held."""
    path, root = old.path, old.root
    files = []
    for item in [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else paths_or_dir:
        p = Path(item).resolve()
        files += [p / r for r in scan_images(p)] if p.is_dir() else [p]
    keyed = {}
    for f in files:
        keyed.setdefault(_stored_path(f, root), f)
    journal = _Journal(path.with_name(path.name + _JOURNAL_SUFFIX),
                       {"kind": "add", "model": embedder.name, "fingerprint": embedder.fingerprint,
                        "dim": int(embedder.dim), "images_root": str(root), "shard": None})
    row_of_path = {p: i for i, p in enumerate(old.paths)}
    row_of_sha = {s: i for i, s in enumerate(old.sha256)}
    done = journal.done()
    report = BuildReport(path, resumed=len(done & set(keyed)))
    report.embedded, report.model_seconds, report.pipeline_seconds = _embed_files(
        embedder, sorted(keyed.items()), journal, done=done, known=set(old.sha256), **embed_options)
    j = journal.read()
    report.skipped = sorted((p, r) for p, r in j["failed"].items() if p in keyed)
    report.duplicates = sorted((p, old.paths[row_of_sha[s]]) for p, s in j["dups"].items()
                               if p in keyed and old.paths[row_of_sha[s]] != p)
    # Each new record replaces a changed file's row, is appended, or is a duplicate.
    replace, append = {}, []
    kept_of_sha = {s: old.paths[i] for s, i in row_of_sha.items()}
    for key in sorted(k for k in j["records"] if k in keyed):
        sha = j["records"][key].sha256
        if sha in kept_of_sha:
            if kept_of_sha[sha] != key:
                report.duplicates.append((key, kept_of_sha[sha]))
            continue
        kept_of_sha[sha] = key
        if key in row_of_path:
            replace[row_of_path[key]] = key
        else:
            append.append(key)
    items = _columns(_record(old, i) for i in range(old.count))
    for row, key in replace.items():
        for c, v in zip(_Records.COLUMNS, j["records"][key].item(key)):
            items[c][row] = v
    new = _items_of(append, j["records"])
    for c in _Records.COLUMNS:
        items[c] += new[c]
    n_old = old.count

    def fill(mm):
        mm[:n_old] = old.vectors
        keys = list(replace.values()) + append
        rows = list(replace) + list(range(n_old, n_old + len(append)))
        _fill_from_journal(mm, keys, j, rows)

    index = _write_index(
        path, model=old.model, fingerprint=old.fingerprint, dim=old.dim, dtype=old.dtype,
        images_root=str(root), items=items, count=n_old + len(append), fill_vectors=fill,
        created=old.created, faiss="auto" if not old.ivf_params else True, ivf_from=old,
        new_rows=(list(replace), list(range(n_old, n_old + len(append)))))
    journal.remove()
    report.indexed = len(replace) + len(append)
    return report, index


class Removed(NamedTuple):
    """What `remove_images` did: the stored paths it removed, and how many images are left."""

    paths: list[str]
    count: int


def remove_images(index_path, paths: Sequence = (), *, missing: bool = False,
                  lock_wait: float | None = None) -> Removed:
    """Remove images from the index at `index_path` and replace it atomically.

    paths: images to remove, as stored (what `search` and `info` print) or as
        file paths (resolved against the index's images_root, as `add_images`
        stores them).  Any path not in the index raises ValueError and
        changes nothing.
    missing: also remove every image whose file no longer exists.
    The vectors file is rewritten without the removed rows; an approximate
    (IVF) index is trained again on what is left.  The writer lock is held
    from reading the index to committing it (lock_wait: see build_index).
    """
    t0 = time.perf_counter()
    path = Path(index_path)
    _read_meta(path)  # a missing index is an error here, not a directory the lock creates
    with _writer_lock(path, "removing images", lock_wait):
        removed, index = _remove_locked(load_index(path), paths, missing)
    if removed:
        log.info("removed %d image(s) from %s in %.1f s; %d left", len(removed), path,
                 time.perf_counter() - t0, index.count)
    return Removed(removed, index.count)


def _remove_locked(old: Index, paths, missing: bool) -> tuple[list[str], Index]:
    """remove_images' work, with the writer lock held: (removed stored paths, the index now)."""
    path = old.path
    row_of_path = {p: i for i, p in enumerate(old.paths)}
    drop, unknown = set(), []
    for given in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        key = str(given)
        if key not in row_of_path:
            key = _stored_path(Path(given).expanduser().resolve(), old.root)
        if key in row_of_path:
            drop.add(row_of_path[key])
        else:
            unknown.append(str(given))
    if unknown:
        raise ValueError(f"{len(unknown)} of the paths to remove are not in {path}: "
                         f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}; "
                         "nothing was removed")
    if missing:
        drop.update(i for i, p in enumerate(old.paths) if not old.full_path(p).is_file())
    if not drop:
        return [], old
    keep = np.asarray([i for i in range(old.count) if i not in drop], dtype=np.int64)
    items = _columns(_record(old, i) for i in keep)

    def fill(mm):
        for start in range(0, len(keep), 65536):  # in slices: a memory map need not be read whole
            rows = keep[start:start + 65536]
            mm[start:start + len(rows)] = old.vectors[rows]

    index = _write_index(
        path, model=old.model, fingerprint=old.fingerprint, dim=old.dim, dtype=old.dtype,
        images_root=str(old.root), items=items, count=len(keep), fill_vectors=fill, created=old.created,
        faiss=bool(old.ivf_params) and len(keep) > 0)
    return sorted(old.paths[i] for i in drop), index


def merge_indexes(paths: Sequence, out_path, *, dtype: str | None = None,
                  faiss: bool | str = "auto", lock_wait: float | None = None) -> BuildReport:
    """Join indexes built by the same model (e.g. the shards of one folder) into `out_path`.

    Rows are ordered by path; a path or a content hash that occurs in several
    parts is kept once (the first in path order, as a full build would).  The
    output's images_root is the first part's.
    dtype: output dtype; default: the first part's.
    Raises IndexFileError if the parts were built by different models.
    """
    t0 = time.perf_counter()
    if not paths:
        raise ValueError("merge_indexes needs at least one index to merge")
    parts = [load_index(p) for p in paths]
    first = parts[0]
    for p in parts[1:]:
        if (p.model, p.fingerprint, p.dim) != (first.model, first.fingerprint, first.dim):
            raise IndexFileError(
                f"cannot merge {p.path} (model {p.model!r}, fingerprint {p.fingerprint[:12]}) with "
                f"{first.path} (model {first.model!r}, fingerprint {first.fingerprint[:12]}): "
                "indexes must be built by the same model")
    report = BuildReport(Path(out_path))
    entries = sorted((path, part_no, row) for part_no, part in enumerate(parts)
                     for row, path in enumerate(part.paths))
    keep, seen_path, first_of_sha = [], set(), {}
    for path, part_no, row in entries:
        sha = parts[part_no].sha256[row]
        if path in seen_path:
            continue
        seen_path.add(path)
        if sha in first_of_sha:
            report.duplicates.append((path, first_of_sha[sha]))
            continue
        first_of_sha[sha] = path
        keep.append((part_no, row))
    items = _columns(_record(parts[pn], r) for pn, r in keep)

    def fill(mm):
        by_part: dict[int, list[tuple[int, int]]] = {}
        for dest, (pn, r) in enumerate(keep):
            by_part.setdefault(pn, []).append((dest, r))
        for pn, pairs in by_part.items():
            dest, rows = (np.asarray(x) for x in zip(*pairs))
            mm[dest] = parts[pn].vectors[rows]

    out = Path(out_path)
    _check_target(out)
    with _writer_lock(out, "merging indexes", lock_wait):
        index = _write_index(out, model=first.model, fingerprint=first.fingerprint, dim=first.dim,
                             dtype=dtype or first.dtype, images_root=str(first.root), items=items,
                             count=len(keep), fill_vectors=fill, faiss=faiss)
    report.indexed = report.count = index.count
    report.seconds = time.perf_counter() - t0
    _log_report("merged into", report)
    return report


def write_vectors_index(out_path, vectors, paths: Sequence[str], *, model: str, fingerprint: str,
                        images_root=".", sizes=None, sha256=None, widths=None, heights=None,
                        dtype: str = "float16", faiss: bool | str = "auto",
                        lock_wait: float | None = None) -> Index:
    """Write an index from precomputed vectors (embeddings made elsewhere, or synthetic ones).

    vectors: (n, dim) array, any float dtype; rows are L2-normalised here.
    paths: n distinct stored paths.  sizes / widths / heights default to 0, and
    sha256 to a hash of the path string (no file bytes are known), so rows are
    never taken for duplicates of each other.
    Returns the written index, loaded.
    """
    v = np.asarray(vectors)
    if v.ndim != 2 or len(v) != len(paths):
        raise ValueError(f"vectors must be (n, dim) with n = len(paths) = {len(paths)}, got {v.shape}")
    if len(set(paths)) != len(paths):
        raise ValueError("paths must be distinct")
    n = len(paths)
    items = {"path": [str(p) for p in paths],
             "size": [int(x) for x in sizes] if sizes is not None else [0] * n,
             "sha256": list(sha256) if sha256 is not None else
             [hashlib.sha256(f"path:{p}".encode()).hexdigest() for p in paths],
             "width": [int(x) for x in widths] if widths is not None else [0] * n,
             "height": [int(x) for x in heights] if heights is not None else [0] * n}

    def fill(mm):
        for start in range(0, n, 65536):  # normalise block by block: no full float32 copy
            mm[start:start + 65536] = _normalise_rows(v[start:start + 65536], f"vectors[{start}:]")

    out = Path(out_path)
    _check_target(out)
    with _writer_lock(out, "writing vectors", lock_wait):
        return _write_index(out, model=model, fingerprint=fingerprint, dim=v.shape[1], dtype=dtype,
                            images_root=str(Path(images_root).resolve()), items=items, count=n,
                            fill_vectors=fill, faiss=faiss)
