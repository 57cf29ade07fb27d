"""What changes an index: build_index, add_images, remove_images, merge_indexes,
write_vectors_index, compact_index, upgrade_index and add_segments, each holding the index's
writer lock from reading the index to committing meta.json.

The full writers (build, merge, write_vectors_index, compact, upgrade) end in _write_index:
one new segment, and a meta.json naming only it.  The incremental ones (add, remove,
add_segments) end in _append_locked: a segment of the new rows and/or a deletion file,
and a meta.json naming the old files and the new, so what they write grows with the
change, not with the index."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from koclip.errors import IndexFileError
from koclip.files import fsync_dir, replacing
from koclip.index import ivf as _ivf
from koclip.index.files import in_shard, parse_shard, scan_images
from koclip.index.format import (
    _DATA_FILE, _JOURNAL_SUFFIX, DTYPES, FORMAT, FORMAT_VERSION, ImageEmbedder, _columns, _commit_meta,
    _holds_writer_lock, _normalise_rows, _now, _read_meta, _writer_lock,
)
from koclip.index.ivf import FAISS_THRESHOLD, _write_faiss, add_part, empty_like, read_trained, write_ivf
from koclip.index.journal import _Journal
from koclip.index import ray_engine
from koclip.index.pipeline import _embed_files
from koclip.index.search import Index, _open_v2, _relative_root, load_index
from koclip.index.segments import _check_schema, _segment_entry, _write_deletions, _write_segment, read_paths

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
    model_seconds, pipeline_seconds: time spent in encode_pixels (engine "ray": per
        model actor, the actors' sum over their number), and in the embedding loop
        as a whole; their ratio is how busy the model (the mean actor) was (below
        ~0.9, image loading is the bottleneck: raise num_workers).
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


def _require_v2(index: Index | dict, what: str, path: Path | None = None) -> None:
    """Writers other than full rewrites need format 2: a format-1 index is upgraded first, on request.
    index: the loaded index, or its meta.json (checked before loading it)."""
    version = index.get("format_version", 1) if isinstance(index, dict) else index.format_version
    path = path or index.path
    if version < 2:
        raise IndexFileError(
            f"index {path} is in format {version}, which koclip reads but no longer changes; "
            f"run `koclip index upgrade {path}` (it rewrites the index as format 2 in place, atomically) "
            f"and then the {what} again")


def _new_meta(out: Path, *, model: str, fingerprint: str, dim: int, dtype: str, images_root: str,
              created: str | None) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "fingerprint": fingerprint,
            "dim": int(dim), "dtype": dtype, "normalised": True, "count": 0, "created": created or _now(),
            "updated": None, "images_root": str(images_root),
            "images_root_relative": _relative_root(out, images_root), "segments": [], "deletions": [], "ivf": None}


def _write_index(out: Path, *, model: str, fingerprint: str, dim: int, dtype: str, images_root: str,
                 blocks, created: str | None = None, faiss: bool | str = "auto", ivf_from: dict | None = None) -> Index:
    """Write a complete index into directory `out` (created if needed) as one segment, commit it, and
    return it loaded.

    blocks: (items, vectors) pairs in row order (see segments.write_segment_file).
    faiss: True / False / "auto" (build an IVF when count >= FAISS_THRESHOLD).
    ivf_from: meta.json's "ivf" entry of the index being rewritten in place (compact): its trained
        IVF is filled again instead of training anew, unless the index has grown past 4x what it was
        trained on.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_target(out)
    if not _holds_writer_lock(out):
        raise RuntimeError(f"_write_index({out}) called without the index's writer lock")
    meta = _new_meta(out, model=model, fingerprint=fingerprint, dim=dim, dtype=dtype, images_root=images_root,
                     created=created)
    segment = _write_segment(out, blocks, start=0, dim=dim, dtype=dtype, model=model, fingerprint=fingerprint)
    meta["segments"] = [segment]
    meta["count"] = segment["rows"]
    index = _open_v2(out, meta)
    if index.count and (faiss is True or (faiss == "auto" and index.count >= FAISS_THRESHOLD)):
        if ivf_from and index.count <= 4 * ivf_from["trained_on"]:
            keep = {k: v for k, v in ivf_from.items() if k != "parts"}
            meta["ivf"], parts = write_ivf(out, index, index.stored_rows, on_disk=index.on_disk,
                                           trained=read_trained(out, ivf_from), keep=keep)
        else:
            meta["ivf"], parts = write_ivf(out, index, index.stored_rows, on_disk=index.on_disk)
        index._ivf = (parts, None)
    _commit_meta(out, meta)
    return index


def _append_locked(old: Index, segments: list[dict], dead: Sequence[int], faiss: bool | str = "auto") -> Index:
    """Commit new `segments` (already written into the index) and mark the live rows at positions
    `dead` deleted (one deletion file), keeping the IVF in step; returns the index as committed.

    With the writer lock held.  Bytes written: the new files and meta.json, whatever the
    index's size.  The IVF is left alone while the rows after its last part number at most
    TAIL_ROWS (searches scan those exactly); past that they become a new part.  It is
    trained again when the index outgrows 4x what it was trained on, and built when an
    index without one reaches FAISS_THRESHOLD (faiss="auto").
    """
    path = old.path
    meta = copy.deepcopy(old.meta)
    meta["segments"] += segments
    if len(dead):
        ids = old._ids_of(np.sort(np.asarray(dead, np.int64)))
        by_segment: dict[str, list[int]] = {}
        for s in old._segments:
            lo, hi = np.searchsorted(ids, [s.start, s.start + s.rows])
            if hi > lo:
                by_segment[s.name] = (ids[lo:hi] - s.start).tolist()
        meta["deletions"].append(_write_deletions(path, by_segment))
    meta["count"] = old.count - len(dead) + sum(s["rows"] for s in segments)
    # The new version, read back (footers only: no vector is read unless an IVF needs it).
    index = _open_v2(path, meta, on_disk=True, lazy=True)
    index.on_disk = index.count >= _ivf.ON_DISK_THRESHOLD  # how its IVF parts are searched
    ivf = meta.get("ivf")
    if index.count == 0:
        meta["ivf"] = None
    elif ivf is None:
        if faiss is True or (faiss == "auto" and index.count >= FAISS_THRESHOLD):
            meta["ivf"], _ = write_ivf(path, index, index.stored_rows, on_disk=index.on_disk)
    elif index.count > 4 * ivf["trained_on"]:
        meta["ivf"], _ = write_ivf(path, index, index.stored_rows, on_disk=index.on_disk)
    elif index.stored_rows - ivf["parts"][-1]["stop"] > _ivf.TAIL_ROWS:
        parts = list(ivf["parts"])
        start = parts[-1]["stop"]
        if len(parts) >= _ivf.MAX_PARTS:
            # Merge the trailing parts smaller than a build's (earlier adds') with the new rows.
            while len(parts) > 1 and parts[-1]["stop"] - parts[-1]["start"] < _ivf.PART_ROWS:
                start = parts.pop()["start"]
        entry, _ = add_part(path, index, ivf, start, index.stored_rows, on_disk=index.on_disk)
        meta["ivf"] = dict(ivf, parts=parts + [entry])
    _commit_meta(path, meta)
    return index


def _journal_blocks(keys: list[str], j: dict, block: int = 65536):
    """(items, float32 vectors) blocks of the journal records of `keys`, in that order, each
    journal chunk read once per block (keys in path order come from neighbouring chunks)."""
    for a in range(0, len(keys), block):
        part = keys[a:a + block]
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for dest, k in enumerate(part):
            by_chunk.setdefault(j["records"][k].chunk, []).append((dest, j["records"][k].row))
        vectors = None
        for chunk, pairs in by_chunk.items():
            dest, rows = (np.asarray(x) for x in zip(*pairs))
            v = _Journal.vectors(j["chunks"][chunk])
            if vectors is None:
                vectors = np.empty((len(part), v.shape[1]), np.float32)
            vectors[dest] = v[rows]
        yield _items_of(part, j["records"]), vectors


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
            images_root=str(root), blocks=_journal_blocks(keep, j), faiss=faiss)
        journal.remove()
    report.indexed = report.count = index.count
    report.seconds = time.perf_counter() - t0
    _log_report("built", report)
    return report


def _items_of(keys: list[str], records: dict) -> dict:
    """Journal records of `keys` -> items columns."""
    return _columns(records[k].item(k) for k in keys)


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
    (`<index_path>.partial/`) and resumable.  The new rows go into one new
    segment (a changed file's old row is marked deleted), committed atomically:
    what is written grows with what is added, not with the index.  The index's
    writer lock is held from reading the index to committing it (lock_wait: see
    build_index).  A format-1 index must be upgraded first (upgrade_index).
    """
    t0 = time.perf_counter()
    path = Path(index_path)
    _require_v2(_read_meta(path), "add", path)  # a missing index is an error here, not a directory the lock creates
    with _writer_lock(path, "adding images", lock_wait):
        old = load_index(path, embedder, on_disk=True)  # the vectors stay on disk: only new rows are written
        _require_v2(old, "add")
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
    # What the index holds, looked up for the few files added: the only reads that grow with it
    # (two columns, ~100 bytes a row; ~1 s for 1M rows on 2 cores).
    paths = old.paths
    row_of_path = {p: i for i, p in enumerate(paths)}
    row_of_sha = {s: i for i, s in enumerate(old.sha256)}
    done = journal.done()
    report = BuildReport(path, resumed=len(done & set(keyed)))
    report.embedded, report.model_seconds, report.pipeline_seconds = _embed_files(
        embedder, sorted(keyed.items()), journal, done=done, known=row_of_sha.keys(), **embed_options)
    j = journal.read()
    report.skipped = sorted((p, r) for p, r in j["failed"].items() if p in keyed)
    report.duplicates = sorted((p, paths[row_of_sha[s]]) for p, s in j["dups"].items()
                               if p in keyed and paths[row_of_sha[s]] != p)
    # Each new record replaces a changed file's row, is appended, or is a duplicate.
    replace, append, claimed = {}, [], {}  # claimed: sha -> the new key that stores it
    for key in sorted(k for k in j["records"] if k in keyed):
        sha = j["records"][key].sha256
        kept = claimed.get(sha, paths[row_of_sha[sha]] if sha in row_of_sha else None)
        if kept is not None:
            if kept != key:
                report.duplicates.append((key, kept))
            continue
        claimed[sha] = key
        if key in row_of_path:
            replace[row_of_path[key]] = key
        else:
            append.append(key)
    new_keys = sorted(list(replace.values()) + append)
    index = old
    if new_keys:
        segment = _write_segment(path, _journal_blocks(new_keys, j), start=old.stored_rows, dim=old.dim,
                                 dtype=old.dtype, model=old.model, fingerprint=old.fingerprint)
        index = _append_locked(old, [segment], list(replace))
    journal.remove()
    report.indexed = len(new_keys)
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
    The removed rows are marked deleted in a new deletion file (nothing else is
    rewritten); searches skip them, in the IVF too, and compact_index drops them
    from disk.  The writer lock is held from reading the index to committing it
    (lock_wait: see build_index).  A format-1 index must be upgraded first.
    """
    t0 = time.perf_counter()
    path = Path(index_path)
    _require_v2(_read_meta(path), "remove", path)  # a missing index is an error here, not a directory the lock creates
    with _writer_lock(path, "removing images", lock_wait):
        old = load_index(path, on_disk=True)
        _require_v2(old, "remove")
        removed, index = _remove_locked(old, paths, missing)
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
    index = _append_locked(old, [], sorted(drop))
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

    def blocks():
        for a in range(0, len(keep), 65536):
            rows = keep[a:a + 65536]
            vectors = np.empty((len(rows), first.dim), np.float32)
            by_part: dict[int, list[tuple[int, int]]] = {}
            for dest, (pn, r) in enumerate(rows):
                by_part.setdefault(pn, []).append((dest, r))
            for pn, pairs in by_part.items():
                dest, src = (np.asarray(x) for x in zip(*pairs))
                vectors[dest] = parts[pn].vectors[src]
            yield _columns(_record(parts[pn], r) for pn, r in rows), vectors

    out = Path(out_path)
    _check_target(out)
    with _writer_lock(out, "merging indexes", lock_wait):
        index = _write_index(out, model=first.model, fingerprint=first.fingerprint, dim=first.dim,
                             dtype=dtype or first.dtype, images_root=str(first.root), blocks=blocks(),
                             faiss=faiss)
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
             [hashlib.sha256(f"path:{p}".encode("utf-8", "surrogateescape")).hexdigest() for p in paths],
             "width": [int(x) for x in widths] if widths is not None else [0] * n,
             "height": [int(x) for x in heights] if heights is not None else [0] * n}

    def blocks():
        for a in range(0, n, 65536):  # normalise block by block: no full float32 copy
            yield ({c: col[a:a + 65536] for c, col in items.items()},
                   _normalise_rows(v[a:a + 65536], f"vectors[{a}:]"))

    out = Path(out_path)
    _check_target(out)
    with _writer_lock(out, "writing vectors", lock_wait):
        return _write_index(out, model=model, fingerprint=fingerprint, dim=v.shape[1], dtype=dtype,
                            images_root=str(Path(images_root).resolve()), blocks=blocks(), faiss=faiss)


class Compacted(NamedTuple):
    """What `compact_index` did: live rows now, deleted rows dropped, segments before (now 1)."""

    count: int
    dropped: int
    segments: int


def compact_index(index_path, *, lock_wait: float | None = None) -> Compacted:
    """Rewrite the index at `index_path` as one segment of its live rows, dropping the rows that
    removals and replacements marked deleted; the IVF is filled again with its trained
    quantizer (trained anew if the index has grown past 4x what it was trained on).

    Costs a full rewrite, like a build without the model: run it when deleted rows or
    segments have piled up (`koclip index info` shows both).  Committed atomically, the
    writer lock held throughout (lock_wait: see build_index).
    """
    path = Path(index_path)
    _require_v2(_read_meta(path), "compact", path)  # a missing index is an error here, not a directory the lock creates
    with _writer_lock(path, "compacting", lock_wait):
        old = load_index(path, on_disk=True)
        _require_v2(old, "compact")
        before = Compacted(old.count, old.deleted, old.segments)
        if old.segments == 1 and not old.deleted:
            return before
        index = _write_index(path, model=old.model, fingerprint=old.fingerprint, dim=old.dim, dtype=old.dtype,
                             images_root=str(old.root), blocks=old.record_blocks(), created=old.created,
                             faiss=True if old.ivf_params else "auto", ivf_from=old.ivf_params)
    log.info("compacted %s: %d rows in 1 segment (were %d segments, %d deleted rows)", path, index.count,
             before.segments, before.dropped)
    return before


def upgrade_index(index_path, *, lock_wait: float | None = None) -> bool:
    """Rewrite a format-1 index (vectors .npy + items .json) at `index_path` as format 2, in place
    and atomically; False (and nothing written) if it is format 2 already.

    Rows, paths, records and settings stay as they were; the faiss IVF file, if any, is
    kept as the one part of the new IVF.  Older koclip versions cannot read the result.
    """
    path = Path(index_path)
    if _read_meta(path).get("format_version", 0) >= FORMAT_VERSION:
        return False
    with _writer_lock(path, "upgrading", lock_wait):
        old = load_index(path)
        if old.format_version >= FORMAT_VERSION:  # another process upgraded it meanwhile
            return False
        meta = _new_meta(path, model=old.model, fingerprint=old.fingerprint, dim=old.dim, dtype=old.dtype,
                         images_root=old.meta["images_root"], created=old.created)
        meta["images_root_relative"] = old.meta.get("images_root_relative")  # in place: as it was
        meta["segments"] = [_write_segment(path, old.record_blocks(), start=0, dim=old.dim, dtype=old.dtype,
                                           model=old.model, fingerprint=old.fingerprint)]
        meta["count"] = meta["segments"][0]["rows"]
        entry = old.meta["files"].get("ivf")
        if entry and old.ivf_params and old.count:
            (part, _, _), = old._load_ivf()[0]
            trained = empty_like(part)
            meta["ivf"] = dict(old.ivf_params, trained=_write_faiss(path, "trained", trained),
                               parts=[dict(entry, start=0, stop=old.count)])
        _commit_meta(path, meta)
    log.info("upgraded %s to format %d", path, FORMAT_VERSION)
    return True


def add_segments(index_path, files: Sequence, *, lock_wait: float | None = None) -> Index:
    """Commit segment files written elsewhere (segments.write_segment_file: other processes or hosts,
    each writing its own) into the index at `index_path`, all in one commit.

    Each file must be a segment of this index's model, dim and dtype.  Their rows are
    appended in the order given; a stored path that the index already holds is replaced
    (its old row marked deleted), and a path given twice is an error.  The files are
    hard-linked into the index (copied where that fails) before the commit, so a crash
    at any point leaves them where they were and the index as it was.
    """
    path = Path(index_path)
    _require_v2(_read_meta(path), "add", path)
    with _writer_lock(path, "adding segments", lock_wait):
        old = load_index(path, on_disk=True)
        _require_v2(old, "add")
        start, segments, incoming = old.stored_rows, [], []
        for f in map(Path, files):
            entry, paths = _link_segment(f, path, old, start)
            segments.append(entry)
            start += entry["rows"]
            incoming += paths
        if len(set(incoming)) != len(incoming):
            raise ValueError(f"the segments to add hold some stored paths more than once (e.g. "
                             f"{next(p for p in incoming if incoming.count(p) > 1)!r}); nothing was added")
        new = set(incoming)
        return _append_locked(old, segments, [i for i, p in enumerate(old.paths) if p in new])


def _link_segment(source: Path, index_dir: Path, index: Index, start: int) -> tuple[dict, list[str]]:
    """Check a segment file written elsewhere against `index` and give it a fresh name inside the
    index directory (a hard link, else a copy): -> (its meta.json entry, its stored paths)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(source), page_checksum_verification=True)
        rows = pf.metadata.num_rows
    except (OSError, ValueError) as e:
        raise IndexFileError(f"segment {source} cannot be read as Parquet ({e})") from None
    _check_schema(source, pf.schema_arrow, index.meta)
    paths = read_paths(pf, source)
    paths = paths if isinstance(paths, list) else paths.to_pylist()
    target = index_dir / f"segment.{secrets.token_hex(6)}.parquet"
    try:
        os.link(source, target)
    except OSError:
        with replacing(target) as tmp:
            shutil.copyfile(source, tmp)
    fsync_dir(index_dir)
    return _segment_entry(target, start, rows), paths
