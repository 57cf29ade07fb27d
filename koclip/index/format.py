"""The on-disk format of an index (described in koclip/index/__init__.py) and the primitives
every reader and writer of it uses.

Constants and the per-image record columns; reading meta.json (format 1 or 2) and
format 1's items.json and vectors file, checked against what meta.json says; and,
for writers, the writer lock, writing a fresh data file and committing meta.json.
Format 2's Parquet files are read and written by koclip.index.segments.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import zlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from koclip.errors import IndexFileError
from koclip.files import atomic_write_bytes, replacing

try:  # advisory locks keep two writers off one index; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "koclip-index"
FORMAT_VERSION = 2  # what writers write; readers read 1 (read-only: `koclip index upgrade`) and 2
DTYPES = ("float16", "float32")

_JOURNAL_SUFFIX = ".partial"
# Data files: format 1's vectors/items; format 2's segment/deleted (Parquet) and trained; ivf in both.
_DATA_FILE = re.compile(r"^(vectors|items|ivf|trained|segment|deleted)\.[0-9a-f]+\.(npy|json|faiss|parquet)$")
_SUFFIX = {"vectors": "npy", "items": "json", "ivf": "faiss", "trained": "faiss", "segment": "parquet",
           "deleted": "parquet"}
_READ_BLOCK = 64 << 20
_MAX_NPY_HEADER = 10000  # numpy's own limit on the header it parses (max_header_size)


@runtime_checkable
class ImageEmbedder(Protocol):
    """What an index needs from an image model.

    name: model name, e.g. "koclip-mini".
    fingerprint: hash of model config, weights and preprocessing; two
        embedders with different fingerprints give incompatible vectors.
    dim: embedding size.
    preprocess(images): list of RGB PIL images -> pixel array (n, ...); CPU
        work, called from worker threads, so it must be thread-safe.
    encode_pixels(pixels): (n, ...) -> (n, dim) float32, rows L2-normalised.
    """

    name: str
    fingerprint: str
    dim: int

    def preprocess(self, images: list) -> np.ndarray: ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_bytes(obj, indent=None) -> bytes:
    """JSON as UTF-8.  File names that are not valid UTF-8 (Linux allows any bytes) keep
    their original bytes (surrogateescape); readers decode with the same error handler."""
    return json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8", "surrogateescape")


def _crc32_file(path: Path) -> str:
    """crc32 of a file as 8 hex digits (fast: ~3 GB/s; guards against truncation and bit rot)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


# Locks held by this process: resolved index directory -> thread that holds it (see _writer_lock).
_HELD: dict[Path, int] = {}
_HELD_GUARD = threading.Lock()
# How long a writer waits for another process's write to the same index before giving up.
LOCK_WAIT_SECONDS = 60.0


def _lock_holder(lock_file: Path) -> str:
    """What the lock file says about the process holding it, for messages."""
    try:
        info = json.loads(lock_file.read_text() or "{}")
        return f"process {info['pid']} ({info['what']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another koclip process"


@contextlib.contextmanager
def _writer_lock(directory: Path, what: str, wait: float | None = None):
    """Hold the index's writer lock (`directory`/.lock, an advisory flock) for the whole block.

    Every writer takes it before reading what it will change and keeps it until
    meta.json is committed, so two writers never commit over each other.  If
    another process holds it, wait up to `wait` seconds (default
    LOCK_WAIT_SECONDS), saying so once, then raise IndexFileError naming the
    holder.  Nested use by the same thread is a no-op; another thread of this
    process waits like another process would.
    """
    wait = LOCK_WAIT_SECONDS if wait is None else wait
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        if _HELD.get(key) == me:
            nested = True
        else:
            nested = False
    if nested or fcntl is None:
        yield
        return
    lock_file = directory / ".lock"
    with open(lock_file, "a+") as f:
        deadline = time.monotonic() + wait
        said = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(lock_file)
                if time.monotonic() >= deadline:
                    raise IndexFileError(
                        f"{directory} is in use by {holder}; waited {wait:g} s for it to finish before "
                        f"{what}. Run this again when it is done, or delete {lock_file} if that process is "
                        "gone") from None
                if not said:
                    log.warning("%s is in use by %s; waiting up to %g s before %s", directory, holder, wait,
                                what)
                    said = True
                time.sleep(0.05)
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "what": what,
                                "since": datetime.datetime.now().strftime("%H:%M:%S")}))
            f.flush()
            with _HELD_GUARD:
                _HELD[key] = me
            yield
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _holds_writer_lock(directory: Path) -> bool:
    with _HELD_GUARD:
        return fcntl is None or _HELD.get(directory.resolve()) == threading.get_ident()


def _normalise_rows(v: np.ndarray, what: str) -> np.ndarray:
    """(n, d) -> float32 rows of unit length; zero or non-finite rows are errors, naming `what`."""
    v = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(bad)[0])} has norm {float(norms[bad][0, 0])}; "
                         "vectors must be finite and non-zero")
    return v / norms


class _Records:
    """Column store for per-image records: key (stored path), size, sha256, width, height."""

    COLUMNS = ("path", "size", "sha256", "width", "height")

    def __init__(self):
        self.cols = {c: [] for c in self.COLUMNS}

    def __len__(self):
        return len(self.cols["path"])

    def add(self, path, size, sha, width, height):
        for c, v in zip(self.COLUMNS, (path, size, sha, width, height)):
            self.cols[c].append(v)


def _columns(records) -> dict[str, list]:
    """Records (tuples in _Records.COLUMNS order) -> {column: list of values}."""
    out = _Records()
    for record in records:
        out.add(*record)
    return out.cols


class _VectorsHolder:
    """Lets a numpy view of faiss-owned memory keep the faiss index (the owner) alive."""

    def __init__(self, owner, array: np.ndarray):
        self._owner = owner
        self.__array_interface__ = array.__array_interface__


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """Read a .npy header from `f` -> (shape, fortran_order, dtype); ValueError if malformed.

    The header's declared length is checked before it is read (numpy would read up to 4 GiB
    first and check after), and whatever numpy's header parser raises on damaged text
    (tokenize and literal_eval errors among them) comes out as ValueError.
    """
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not one numpy writes (1.0, 2.0, 3.0)")
    width = 2 if version == (1, 0) else 4
    length = f.read(width)
    if len(length) != width:
        raise ValueError("the file ends inside the .npy header")
    n = int.from_bytes(length, "little")
    if n > _MAX_NPY_HEADER:
        raise ValueError(f"the .npy header claims {n:,} bytes; numpy writes at most {_MAX_NPY_HEADER:,}")
    text = f.read(n)
    if len(text) != n:
        raise ValueError("the file ends inside the .npy header")
    header = io.BytesIO(length + text)
    try:
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(header)
        return np.lib.format.read_array_header_2_0(header)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy parses the header with tokenize, ast and np.dtype
        raise ValueError(f"the .npy header does not parse ({type(e).__name__}: {e})") from None


def _flat_index(dim: int, dtype: str):
    """An exact (brute-force) inner-product faiss index whose code bytes are the raw vectors."""
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    if dtype == "float16":
        # fp16 codes are IEEE half floats; scores are computed in float32 with F16C SIMD.
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


def _read_vectors(path: Path, count: int, dim: int, dtype: str, expect: dict):
    """vectors.npy -> (flat faiss index, read-only (count, dim) numpy view of its memory).

    Reads the file straight into the faiss index's storage (one copy in RAM),
    checking size, header and crc32 on the way.
    """
    # Deferred: faiss loads on first use, not with koclip.index.
    import faiss

    size = path.stat().st_size
    if size != expect["bytes"]:
        raise IndexFileError(f"vectors file {path} is {size:,} bytes but meta.json says {expect['bytes']:,}: "
                             "the file is truncated or was replaced; rebuild the index")
    nbytes = count * dim * np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        try:
            shape, fortran, dt = _npy_header(f)
        except ValueError as e:
            raise IndexFileError(f"vectors file {path} has a corrupt header ({e}); rebuild the index") from None
        if shape != (count, dim) or fortran or dt != np.dtype(dtype).newbyteorder("<"):
            raise IndexFileError(f"vectors file {path} holds {shape} {dt} but meta.json says "
                                 f"({count}, {dim}) {dtype}; the index is inconsistent, rebuild it")
        header = f.tell()
        if size != header + nbytes:
            raise IndexFileError(f"vectors file {path} is {size:,} bytes, expected {header + nbytes:,}")
        flat = _flat_index(dim, dtype)  # only now: meta.json's dim and count are the file's
        f.seek(0)
        crc = zlib.crc32(f.read(header))
        if nbytes:
            flat.codes.resize(nbytes)
            buf = faiss.rev_swig_ptr(flat.codes.data(), nbytes)
            view = memoryview(buf)
            pos = 0
            while pos < nbytes:
                got = f.readinto(view[pos:pos + _READ_BLOCK])
                if not got:
                    raise IndexFileError(f"vectors file {path} ended early at byte {header + pos:,}")
                crc = zlib.crc32(view[pos:pos + got], crc)
                pos += got
            flat.ntotal = count
            array = np.asarray(_VectorsHolder(flat, buf)).view(dtype).reshape(count, dim)
        else:
            array = np.zeros((0, dim), dtype)
    if f"{crc:08x}" != expect["crc32"]:
        raise IndexFileError(f"vectors file {path} fails its checksum (crc32 {crc:08x}, meta.json says "
                             f"{expect['crc32']}): the file is corrupt; rebuild the index")
    array.flags.writeable = False
    return flat, array


def _read_items(path: Path, count: int, expect: dict) -> dict:
    data = path.read_bytes()
    if len(data) != expect["bytes"] or f"{zlib.crc32(data):08x}" != expect["crc32"]:
        raise IndexFileError(f"items file {path} is truncated or corrupt (size or crc32 differ from "
                             "meta.json); rebuild the index")
    try:
        items = json.loads(data.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise IndexFileError(f"items file {path} is not valid JSON ({e}); rebuild the index") from None
    if not isinstance(items, dict):
        raise IndexFileError(f"items file {path} holds a JSON {type(items).__name__}, expected an object "
                             f"of columns {list(_Records.COLUMNS)}; rebuild the index")
    for c in _Records.COLUMNS:
        column = items.get(c, [])
        if not isinstance(column, list) or len(column) != count:
            got = f"{len(column)} values" if isinstance(column, list) else f"a {type(column).__name__}"
            raise IndexFileError(f"items file {path} has {got} for {c!r}, expected a list of {count}; "
                                 "rebuild the index")
        want = str if c in ("path", "sha256") else int
        kinds = set(map(type, column))
        if not kinds <= {want}:
            bad = next(x for x in column if type(x) is not want)
            raise IndexFileError(f"items file {path} has {bad!r} in column {c!r}, where every value is "
                                 f"a{'n' if want is int else ''} {want.__name__}; rebuild the index")
    return items


def _read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        hint = ""
        journal = path.with_name(path.name + _JOURNAL_SUFFIX)
        if journal.is_dir():
            hint = f" A build into it was interrupted; run it again to finish ({journal} holds its progress)."
        what = "does not exist" if not path.exists() else "is not a koclip index (no meta.json)"
        raise IndexFileError(f"index {str(path)!r} {what}.{hint}")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise IndexFileError(f"{meta_path} is not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{meta_path} is not koclip index metadata (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version", 0)
    if not _is_count(version):
        raise IndexFileError(f"{meta_path} has format_version {version!r}, expected an integer; "
                             "the metadata is corrupt")
    if version > FORMAT_VERSION:
        raise IndexFileError(f"index {path} has format version {meta['format_version']}; this koclip reads "
                             f"versions up to {FORMAT_VERSION}; upgrade koclip")
    data = ("files",) if version < 2 else ("segments", "deletions")
    required = ("model", "fingerprint", "dim", "dtype", "count", "images_root") + data
    missing = [k for k in required if k not in meta]
    if missing or meta["dtype"] not in DTYPES:
        raise IndexFileError(f"{meta_path} lacks fields {missing} or has dtype {meta.get('dtype')!r} "
                             f"(valid: {DTYPES}); the metadata is corrupt")
    problem = _meta_problem(meta) if version < 2 else _meta_problem_v2(meta)
    if problem:
        raise IndexFileError(f"{meta_path} {problem}; the metadata is corrupt")
    return meta


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def _common_problem(meta: dict) -> str | None:
    """What is wrong with the fields that both formats share, or None."""
    for key in ("model", "fingerprint", "images_root"):
        if not isinstance(meta[key], str):
            return f"has {key} {meta[key]!r}, expected a string"
    for key in ("images_root_relative", "created", "updated"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"has {key} {meta[key]!r}, expected a string or null"
    if not _is_count(meta["dim"]) or meta["dim"] >= 1 << 31:
        return f"has dim {meta['dim']!r}, expected an integer from 0 to 2**31 - 1"
    if not _is_count(meta["count"]) or meta["count"] >= 1 << 62:
        return f"has count {meta['count']!r}, expected a non-negative integer"
    return None


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the types of a format-1 meta.json's fields, or None: the rest of the code
    takes them as the writers wrote them (dim and count ints, file entries naming our own files)."""
    problem = _common_problem(meta)
    if problem:
        return problem
    files = meta["files"]
    if not isinstance(files, dict):
        return f"has files {files!r}, expected an object"
    for stem in ("items", "vectors", "ivf"):
        entry = files.get(stem)
        if entry is None and stem == "ivf":
            continue
        name = entry.get("name") if isinstance(entry, dict) else None
        match = _DATA_FILE.match(name) if isinstance(name, str) else None
        if not match or match.group(1) != stem:
            return (f"has files.{stem} {entry!r}; expected {{\"name\": \"{stem}.<hex>.<ext>\", \"bytes\": ..., "
                    "\"crc32\": ...}, naming a file inside the index")
        if not _is_count(entry.get("bytes")) or not isinstance(entry.get("crc32"), str):
            return f"has files.{stem} {entry!r}, whose bytes must be an integer and crc32 a hex string"
    ivf = meta.get("ivf")
    if ivf is not None and not (isinstance(ivf, dict) and _is_count(ivf.get("nprobe", 1))
                                and _is_count(ivf.get("trained_on", 0))):
        return f"has ivf {ivf!r}, expected null or an object with integer nprobe and trained_on"
    return None


def _entry_problem(entry, stem: str, where: str, keys: tuple[str, ...]) -> str | None:
    """What is wrong with one file entry of a format-2 meta.json, or None."""
    name = entry.get("name") if isinstance(entry, dict) else None
    match = _DATA_FILE.match(name) if isinstance(name, str) else None
    if not match or match.group(1) != stem or match.group(2) != _SUFFIX[stem]:
        return (f"has {where} {entry!r}; expected {{\"name\": \"{stem}.<hex>.{_SUFFIX[stem]}\", ...}} naming a "
                "file inside the index")
    for key in keys:
        value = entry.get(key)
        crc = key.endswith("crc32")
        if not (isinstance(value, str) if crc else _is_count(value)):
            return f"has {where} {entry!r}, whose {key} must be {'a hex string' if crc else 'an integer'}"
    return None


def _meta_problem_v2(meta: dict) -> str | None:
    """What is wrong with a format-2 meta.json's fields, or None: segments listed in order with
    contiguous row ids, deletions and IVF parts naming our own files, counts that add up."""
    problem = _common_problem(meta)
    if problem:
        return problem
    segments, deletions = meta["segments"], meta["deletions"]
    if not isinstance(segments, list) or not isinstance(deletions, list):
        return "has segments or deletions that are not lists"
    start = 0
    for i, seg in enumerate(segments):
        problem = _entry_problem(seg, "segment", f"segments[{i}]", ("start", "rows", "bytes", "footer_crc32"))
        if problem:
            return problem
        if seg["start"] != start:
            return f"has segments[{i}] starting at row id {seg['start']}, expected {start} (the rows before it)"
        start += seg["rows"]
    if len({s["name"] for s in segments}) != len(segments):
        return "lists a segment twice"
    for i, d in enumerate(deletions):
        problem = _entry_problem(d, "deleted", f"deletions[{i}]", ("rows", "bytes", "crc32"))
        if problem:
            return problem
    if meta["count"] != start - sum(d["rows"] for d in deletions):
        return (f"has count {meta['count']}, but its segments hold {start} rows of which its deletion files "
                f"mark {sum(d['rows'] for d in deletions)}")
    ivf = meta.get("ivf")
    if ivf is None:
        return None
    if not (isinstance(ivf, dict) and _is_count(ivf.get("nprobe")) and _is_count(ivf.get("trained_on"))
            and _is_count(ivf.get("nlist")) and isinstance(ivf.get("parts"), list) and ivf["parts"]):
        return f"has ivf {ivf!r}, expected null or an object with integer nlist, nprobe, trained_on and parts"
    problem = _entry_problem(ivf.get("trained"), "trained", "ivf.trained", ("bytes", "crc32"))
    if problem:
        return problem
    stop = 0
    for i, part in enumerate(ivf["parts"]):
        problem = _entry_problem(part, "ivf", f"ivf.parts[{i}]", ("start", "stop", "bytes", "crc32"))
        if problem:
            return problem
        if part["start"] != stop or part["stop"] < part["start"]:
            return f"has ivf.parts[{i}] for row ids {part['start']} to {part['stop']}, expected from {stop} on"
        stop = part["stop"]
    if stop > start:
        return f"has IVF parts up to row id {stop}, but its segments hold {start} rows"
    return None


def _data_names(meta: dict) -> set[str]:
    """The data files that meta.json (format 1 or 2) names."""
    if meta.get("format_version", 0) < 2:
        return {e["name"] for e in meta["files"].values() if e}
    names = {e["name"] for e in meta["segments"] + meta["deletions"]}
    if meta.get("ivf"):
        names |= {meta["ivf"]["trained"]["name"]} | {p["name"] for p in meta["ivf"]["parts"]}
    return names


def check_compatible(meta: dict, embedder, where) -> None:
    """Raise IndexFileError if `embedder` is not the model that built the index described by `meta`."""
    if embedder is None:
        return
    if embedder.name != meta["model"] or embedder.fingerprint != meta["fingerprint"] \
            or int(embedder.dim) != meta["dim"]:
        raise IndexFileError(
            f"index {where} was built with model {meta['model']!r} (fingerprint {meta['fingerprint']}, "
            f"dim {meta['dim']}) but the loaded model is {embedder.name!r} (fingerprint "
            f"{embedder.fingerprint}, dim {embedder.dim}): the config, weights or image preprocessing "
            f"differ, so its vectors would score wrongly; load the model that built it or rebuild the index "
            "with this one")


def _write_data_file(directory: Path, stem: str, suffix: str, write_path, *, checksum: bool = True) -> dict:
    """Write a new data file `<stem>.<token><suffix>` via write_path(tmp_path); returns its meta entry:
    name, bytes and (when `checksum`) the crc32 of the whole file."""
    name = f"{stem}.{secrets.token_hex(6)}{suffix}"
    final = directory / name
    with replacing(final) as tmp:
        write_path(tmp)
    entry = {"name": name, "bytes": final.stat().st_size}
    if checksum:
        entry["crc32"] = _crc32_file(final)
    return entry


def _commit_meta(directory: Path, meta: dict) -> None:
    """Atomically replace meta.json, then delete data and temp files it no longer names.

    Only the holder of the writer lock calls this, and only it writes data files into
    the index directory, so a file meta.json does not name is left over from an older
    version or from a writer that stopped before its commit."""
    meta["updated"] = _now()
    atomic_write_bytes(directory / "meta.json", _json_bytes(meta, indent=1))
    keep = _data_names(meta)
    for p in directory.iterdir():
        if (_DATA_FILE.match(p.name) and p.name not in keep) or p.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
