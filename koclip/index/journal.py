"""The journal of a build in progress (`<index>.partial/`): chunk files of finished images,
committed atomically, so that a killed build or add resumes where it stopped."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from koclip.errors import IndexFileError
from koclip.files import atomic_write, atomic_write_bytes
from koclip.index.format import _npy_header, _Records

log = logging.getLogger(__name__)


class JournalRecord(NamedTuple):
    """Where the journal holds one embedded image, and what is known of its file."""

    chunk: int  # position of its chunk file in _Journal.read()["chunks"]
    row: int  # its row in that chunk's vectors
    size: int
    sha256: str
    width: int
    height: int

    def item(self, path: str) -> tuple:
        """The image's record in _Records.COLUMNS order, stored under `path`."""
        return (path, self.size, self.sha256, self.width, self.height)


class _Journal:
    """Chunk files of a build in progress: `<dir>/chunk-000001.npz`, ... plus `job.json`.

    A chunk holds the vectors (float32) and records of the images it finished,
    plus the unreadable ones and duplicates, so that none is redone on resume.
    """

    def __init__(self, directory: Path, job: dict):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        job_path = self.dir / "job.json"
        if job_path.exists():
            try:
                old = json.loads(job_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != job:
                what = ("an unreadable job" if old is None else
                        f"a run by model {old.get('model')!r} (fingerprint {str(old.get('fingerprint'))[:12]}) "
                        f"on {old.get('images_root')!r}, shard {old.get('shard')}")
                raise IndexFileError(
                    f"{self.dir} holds an unfinished {what}, which differs from this run "
                    f"(model {job['model']!r}, fingerprint {job['fingerprint'][:12]}, {job['images_root']!r}, "
                    f"shard {job['shard']}); rerun with the same settings to resume, or delete {self.dir} "
                    "to start over")
        else:
            atomic_write_bytes(job_path, json.dumps(job, indent=1).encode())
        self._seq = max((int(p.stem.split("-")[1]) for p in self._chunks()), default=0)

    def _chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz"))

    def commit(self, records: _Records, vectors: list[np.ndarray], failed: list, dups: list) -> None:
        """Write one chunk atomically; empty commits are skipped."""
        if not len(records) and not failed and not dups:
            return
        self._seq += 1
        arrays = {
            "path": np.array(records.cols["path"], dtype=str),
            "size": np.array(records.cols["size"], dtype=np.int64),
            "sha256": np.array(records.cols["sha256"], dtype=str),
            "width": np.array(records.cols["width"], dtype=np.int64),
            "height": np.array(records.cols["height"], dtype=np.int64),
            "vectors": (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)),
            "failed_path": np.array([p for p, _ in failed], dtype=str),
            "failed_reason": np.array([r for _, r in failed], dtype=str),
            "dup_path": np.array([p for p, _ in dups], dtype=str),
            "dup_sha256": np.array([s for _, s in dups], dtype=str),
        }
        atomic_write(self.dir / f"chunk-{self._seq:06d}.npz", lambda f: np.savez(f, **arrays))

    def read(self) -> dict:
        """All chunks' records (vectors stay on disk; see `vectors`) ->
        {"records": {path: JournalRecord}, "chunks": [chunk paths],
        "failed": {path: reason}, "dups": {path: sha}}.  A chunk that cannot be read
        (only possible through disk damage) is deleted, so its images are simply done again."""
        out = {"records": {}, "chunks": [], "failed": {}, "dups": {}}
        for p in self._chunks():
            try:
                c = self._chunk_columns(p)
            # A chunk is our own file, so any failure to read it (zipfile and numpy raise a dozen
            # types on damaged bytes) means damage; dropping it costs only re-embedding its images.
            except Exception as e:  # noqa: BLE001
                log.warning("journal chunk %s is unreadable (%s: %s); its images will be embedded again",
                            p, type(e).__name__, e)
                p.unlink()
                continue
            no = len(out["chunks"])
            out["chunks"].append(p)
            for row, (path, size, sha, w, h) in enumerate(zip(
                    c["path"].tolist(), c["size"].tolist(), c["sha256"].tolist(),
                    c["width"].tolist(), c["height"].tolist())):
                out["records"][path] = JournalRecord(no, row, size, sha, w, h)
                out["failed"].pop(path, None)
            for path, reason in zip(c["failed_path"].tolist(), c["failed_reason"].tolist()):
                out["failed"][path] = reason
            for path, sha in zip(c["dup_path"].tolist(), c["dup_sha256"].tolist()):
                out["dups"][path] = sha
        return out

    _TEXT = ("path", "sha256", "failed_path", "failed_reason", "dup_path", "dup_sha256")
    _INTS = ("size", "width", "height")

    @classmethod
    def _chunk_columns(cls, p: Path) -> dict:
        """A chunk's record columns (all but the vectors), checked to be what `commit` writes:
        1-D text and integer columns of matching lengths, and as many vector rows as records."""
        with np.load(p, allow_pickle=False) as z:
            c = {k: z[k] for k in z.files if k != "vectors"}
            with z.zip.open("vectors.npy") as f:  # only the header: check the shape
                shape, _, dtype = _npy_header(f)
        for k in cls._TEXT + cls._INTS:
            kind = "U" if k in cls._TEXT else "i"
            if k not in c or c[k].ndim != 1 or c[k].dtype.kind != kind:
                got = f"{c[k].shape} {c[k].dtype}" if k in c else "nothing"
                raise ValueError(f"column {k!r} holds {got}, expected a 1-D {'text' if kind == 'U' else 'int'} array")
        n = len(c["path"])
        if any(len(c[k]) != n for k in _Records.COLUMNS) or len(c["failed_path"]) != len(c["failed_reason"]) \
                or len(c["dup_path"]) != len(c["dup_sha256"]):
            raise ValueError("its columns differ in length")
        if len(shape) != 2 or shape[0] != n or dtype.kind != "f":
            raise ValueError(f"{shape} {dtype} vectors for {n} records")
        return c

    @staticmethod
    def vectors(chunk: Path) -> np.ndarray:
        """The (n, dim) float32 vectors of one chunk."""
        try:
            with np.load(chunk, allow_pickle=False) as z:
                v = z["vectors"]
            if v.ndim != 2 or v.dtype.kind != "f":
                raise ValueError(f"its vectors are {v.shape} {v.dtype}, not a 2-D float array")
            return v
        except Exception as e:  # noqa: BLE001 - as in `read`: any failure means a damaged chunk
            raise IndexFileError(f"journal chunk {chunk} became unreadable ({type(e).__name__}: {e}); delete it "
                                 "and run the same command again to redo its images") from None

    def done(self) -> set[str]:
        j = self.read()
        return set(j["records"]) | set(j["failed"]) | set(j["dups"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
