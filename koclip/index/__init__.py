"""Image-embedding indexes: build one from a photo folder, store, load, search, merge.

    report = build_index(embedder, "photos/", "photos.kidx")
    index = load_index("photos.kidx", embedder)
    hits = index.search(text_vector, k=10)        # [SearchResult(path, score, rank), ...]

On disk an index is a directory:

    photos.kidx/
      meta.json               the commit point: index-level fields, and the name,
                              size and crc32 of each data file below
      vectors.<token>.npy     (count, dim) float16 (default) or float32, rows L2-normalised
      items.<token>.json      per-image columns, row i <-> vector i:
                              path (relative to images_root, '/'-separated), size,
                              sha256 (of the file bytes), width, height
      ivf.<token>.faiss       optional approximate index (faiss IVF, ids = vector rows)

meta.json records images_root both as an absolute path and relative to the
index directory.  On loading, the relative one wins when that folder exists,
so an index and its photos moved or cloned together (a repository, a copied
drive) still find each other; an index moved on its own uses the absolute one.

Data files are never changed in place.  A writer adds files under fresh names,
then replaces meta.json (os.replace, atomic) and only then deletes the files
meta.json no longer names, so a crash at any moment leaves the old index or the
new one, never a mix.  Each content hash is stored once.

A build keeps a journal next to its output, `photos.kidx.partial/`: every few
hundred images it commits a chunk file (vectors + records, written atomically).
Running the same build again skips what the chunks hold, so a killed build
loses at most one uncommitted chunk; the journal is deleted once the index is
written.

Search is exact by default: a brute-force faiss scan whose storage *is* the
vectors file, read once into memory (numpy's fp16 -> fp32 casts ran ~10x
slower than faiss's SIMD scan: ~1 s against ~60-85 ms for 1M x 512 on 2 cores).
From FAISS_THRESHOLD vectors up, writing an index also builds a faiss IVF
(inverted lists of fp16 codes), with nprobe calibrated for recall@10 >= 0.95;
it costs a second copy of the vectors in memory.

The code is split by job, each module importing only modules listed before it:
files (which images a folder holds; shards), format (the constants and record
columns, reading and checking the files above, the writer lock and the commit
of meta.json), ivf (the approximate backend), journal, pipeline (embedding
images into the journal), search (Index, load_index), ops (build, add,
remove, merge, write_vectors_index) and cli (`koclip index ...`).
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
