"""Image-embedding indexes: build one from a photo folder, store, load, search, add, remove, merge.

    report = build_index(embedder, "photos/", "photos.kidx")
    index = load_index("photos.kidx", embedder)
    hits = index.search(text_vector, k=10)        # [SearchResult(path, score, rank), ...]
    add_images("photos.kidx", embedder, "photos/new/")   # writes only the new rows

On disk an index is a directory (format 2):

    photos.kidx/
      meta.json                  the commit point: index-level fields, and every data file
                                 below with its size and checksum
      segment.<token>.parquet    rows: per-image columns and vectors (Apache Parquet)
      deleted.<token>.parquet    deletion records: rows of segments that no longer count
      trained.<token>.faiss      optional approximate index: the trained, empty faiss IVF,
      ivf.<token>.faiss          and its parts, each holding the vectors of a range of row ids

A segment has one row per image, in these columns:

    path        string, the stored path: relative to images_root ('/'-separated), or absolute
    path_bytes  binary, null unless the file name is not valid UTF-8: then its exact bytes
                (and `path` shows each bad byte as U+FFFD)
    size        int64, bytes of the file
    sha256      string, 64 hex digits, of the file's bytes
    width, height  int32, pixels
    vector      fixed_size_list<float16 or float32>[dim], L2-normalised

and key-value metadata "koclip" (JSON: model, fingerprint, dim, dtype).  meta.json lists
the segments in order, each with its first row id ("start", the rows of the segments
before it), "rows", "bytes" and "footer_crc32"; row i of a segment has row id start + i.
A deletion file has columns segment (a segment's file name) and row (int64, a row within
it); meta.json lists them with "rows", "bytes" and "crc32".  The index's rows are the
segments' rows in order, less those a deletion file names.  With pyarrow alone:

    meta = json.load(open("photos.kidx/meta.json"))
    dead = {}
    for d in meta["deletions"]:
        t = pq.read_table(f"photos.kidx/{d['name']}")
        for seg, row in zip(t["segment"].to_pylist(), t["row"].to_pylist()):
            dead.setdefault(seg, set()).add(row)
    table = pa.concat_tables(
        pq.read_table(f"photos.kidx/{s['name']}").filter(
            pa.array([i not in dead.get(s["name"], ()) for i in range(s["rows"])]))
        for s in meta["segments"])

(DuckDB: read_parquet([segment files], filename=true, file_row_number=true), anti-joined
with the deletion files.)  Read only the files meta.json names: others in the folder are
left over from an older version or from a writer that stopped before its commit.

Integrity.  Every Parquet page carries a CRC32 (Parquet's page checksum), verified as
koclip reads it; meta.json holds each segment's size and the crc32 of its footer (the
metadata saying where the pages are, which no page checksum covers).  So loading checks
sizes and footers (a few KB a segment) and every page it reads is checked on the way,
without reading any byte twice; an index kept on disk (below) reads its vectors only for
exact search, and a whole-file checksum would have to read them all.  Deletion files and
faiss files read into memory are checked against their whole-file crc32; faiss files that
are memory-mapped, by size only (they are read a list at a time, as searches need them).

meta.json records images_root both as an absolute path and relative to the
index directory.  On loading, the relative one wins when that folder exists,
so an index and its photos moved or cloned together (a repository, a copied
drive) still find each other; an index moved on its own uses the absolute one.

Data files are never changed in place.  A writer holds the index's lock (.lock) from
reading it to its commit: it adds files under fresh names, then replaces meta.json
(os.replace, atomic) and only then deletes the files meta.json no longer names, so a
crash at any moment leaves the old index or the new one, never a mix.  add_images
writes one segment of the new rows (and a deletion file for the rows of files that
changed); remove_images writes a deletion file; so both write in proportion to the
change.  compact_index rewrites the live rows as one segment, when asked; build,
merge and write_vectors_index write one segment.  Segments can also be written apart,
by several processes or hosts (write_segment_file), and committed together by
add_segments.

Format 1 (koclip before segments: vectors.<token>.npy, (count, dim), and items.<token>.json,
{column: list}, named in meta.json's "files") is still read, and searched, but not changed:
add, remove and compact ask for `koclip index upgrade` (upgrade_index), which rewrites it
as format 2 in place, atomically, keeping its IVF file as the first part.  Full rewrites
(build, merge) over a format-1 index write format 2.

A build keeps a journal next to its output, `photos.kidx.partial/`: every few
hundred images it commits a chunk file (vectors + records, written atomically).
Running the same build again skips what the chunks hold, so a killed build
loses at most one uncommitted chunk; the journal is deleted once the index is
written.

Search is exact by default: a brute-force faiss scan over the vectors, read once into
the scan's own storage (numpy's fp16 -> fp32 casts ran ~10x slower than faiss's SIMD
scan: ~1 s against ~60-85 ms for 1M x 512 on 2 cores).  From FAISS_THRESHOLD vectors
up, writing an index also builds a faiss IVF (inverted lists of the stored fp16 codes),
with nprobe calibrated for recall@10 >= 0.95, in parts of at most ivf.PART_ROWS rows;
rows added later are scanned exactly beside it until they are many enough for a part
of their own (ivf.TAIL_ROWS), and deleted rows are skipped by a faiss IDSelector.
From ON_DISK_THRESHOLD vectors up (or with load_index(..., on_disk=True)), the IVF's
inverted lists stay in their files, memory-mapped (faiss IO_FLAG_MMAP), and the vectors
are not read at all unless an exact search asks: resident memory is the paths, the
quantizer and the lists that searches have visited, which are handed back (madvise) once
they pass ivf.MAPPED_FRACTION of the IVF files (ivf.MappedPages; load_index's max_mapped).
The kernel keeps them in its page cache while memory allows, so a search after a hand-back
finds its lists there without reading the disk.

The code is split by job, each module importing only modules listed before it:
files (which images a folder holds; shards), format (the constants and record
columns, meta.json and format 1's files, the writer lock and the commit of
meta.json), segments (format 2's Parquet files), ivf (the approximate backend and its
files), journal, pipeline (embedding images into the journal), search (Index,
load_index), ops (build, add, remove, merge, compact, upgrade, add_segments,
write_vectors_index) and cli (`koclip index ...`).
"""

from __future__ import annotations

from koclip.index.files import IMAGE_EXTENSIONS, in_shard, parse_shard, scan_images
from koclip.index.format import DTYPES, LOCK_WAIT_SECONDS, ImageEmbedder, check_compatible
from koclip.index.ivf import FAISS_THRESHOLD, ON_DISK_THRESHOLD, default_nlist
from koclip.index.ops import (
    ENGINES, BuildReport, Compacted, Removed, add_images, add_segments, build_index, compact_index, merge_indexes,
    remove_images, upgrade_index, write_vectors_index,
)
from koclip.index.search import Index, SearchResult, load_index
from koclip.index.segments import write_segment_file

__all__ = [
    "ENGINES", "ImageEmbedder", "Index", "SearchResult", "BuildReport", "Removed", "Compacted", "build_index",
    "add_images", "remove_images", "merge_indexes", "compact_index", "upgrade_index", "add_segments",
    "write_segment_file", "load_index", "write_vectors_index", "scan_images", "parse_shard", "in_shard",
    "check_compatible", "default_nlist", "IMAGE_EXTENSIONS", "FAISS_THRESHOLD", "ON_DISK_THRESHOLD", "DTYPES",
    "LOCK_WAIT_SECONDS",
]
