"""koclip.index at scale: the cost of an add, and search with the IVF on disk, against format 1.

    add     Adds --add photos (tiny PNGs, a stand-in model that returns synthetic vectors) with
            add_images to an index of --n synthetic 512-d fp16 vectors with an IVF (what a build
            makes from FAISS_THRESHOLD up): seconds, and bytes written (the files new in the
            index, and what the process wrote to disk, journal included), for format 1 (the
            koclip of git revision --v1-rev, run from a `git archive` of it) and format 2 (this
            checkout), in the same run.  Also the one-off `upgrade_index` of the format-1 index.
    search  For each of --sizes: builds an index of synthetic CLIP-like vectors with its IVF
            (build seconds and peak RSS), then in a fresh process loads it on disk and
            measures: load time, RSS (private memory and mapped file pages apart), one-query
            top-10 latency (median; first query after dropping the files from the page cache,
            and warm), and recall@10 against exact search on fresh queries.  --v1-sizes does the
            same for format 1 (vectors and IVF in memory), for the figures beside today's.
    read    Writes an index of --n vectors (no IVF) and times reading its vectors into memory
            (what exact search does first), from disk (after dropping the files from the page
            cache) and from the page cache, three times each, each in a fresh process.

Each measurement runs in its own process, so one's memory does not count in another's.

    python benchmarks/index_scale.py add [--n 1000000] [--add 1000]
    python benchmarks/index_scale.py search [--sizes 1000000,10000000] [--v1-sizes 1000000]
    python benchmarks/index_scale.py read [--n 1000000]
    python benchmarks/index_scale.py all  [--dir /tmp/x] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DIM = 512


# ---------------------------------------------------------------- measurements inside a worker

def proc_status() -> dict:
    """VmRSS, RssAnon (private memory) and RssFile (mapped file pages: page cache) in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def proc_io() -> dict:
    """Bytes this process passed to write() (wchar) and sent to storage or dirtied (write_bytes)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def dir_files(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir() if p.is_file()}


def drop_page_cache(d: Path) -> None:
    """Evict an index's files from the page cache (clean pages go; nothing is mapped yet)."""
    for p in d.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def clip_like_blocks(n: int, seed: int, block: int = 65536):
    """(m, DIM) float16 unit vectors, n in all, a block at a time: index_search.synthetic's
    CLIP-like distribution (a 64-d subspace with a decaying spectrum, plus a little noise)."""
    basis = np.linalg.qr(np.random.default_rng(12345).standard_normal((DIM, 64)))[0].astype(np.float32)
    spectrum = (1.0 / np.sqrt(np.arange(1, 65))).astype(np.float32)
    for b, start in enumerate(range(0, n, block)):
        rng = np.random.default_rng([seed, b])
        m = min(block, n - start)
        x = (rng.standard_normal((m, 64), dtype=np.float32) * spectrum) @ basis.T
        x += 0.02 * rng.standard_normal((m, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, x.astype(np.float16)


def write_index(path: str, n: int, seed: int, faiss: bool) -> dict:
    """An index of n synthetic CLIP-like vectors, with or without its IVF.  Format 2 takes them a
    block at a time (what a build from a journal does); format 1 as one array (its only way)."""
    import resource
    import threading

    from koclip import index as kidx

    peak_private = [0]
    done = threading.Event()

    def watch():  # the kernel keeps no high-water mark of private memory alone: sample it
        while not done.wait(0.2):
            peak_private[0] = max(peak_private[0], proc_status()["RssAnon"])

    threading.Thread(target=watch, daemon=True).start()
    names = lambda a, b: [f"{i:08d}.jpg" for i in range(a, b)]
    t = time.perf_counter()
    if hasattr(kidx, "write_segment_file"):
        from koclip.index.format import _writer_lock
        from koclip.index.ops import _write_index

        making = [0.0]  # seconds spent making the vectors, not counted

        def blocks():
            made = clip_like_blocks(n, seed)
            while True:
                t0 = time.perf_counter()
                start, v = next(made, (None, None))
                if start is None:
                    return
                m = len(v)
                items = {"path": names(start, start + m), "size": [0] * m,
                         "sha256": [f"{i:064x}" for i in range(start, start + m)], "width": [0] * m, "height": [0] * m}
                making[0] += time.perf_counter() - t0
                yield items, v

        with _writer_lock(Path(path), "benchmark"):
            _write_index(Path(path), model="synthetic", fingerprint="clip-like", dim=DIM, dtype="float16",
                         images_root=str(Path(path).parent), blocks=blocks(), faiss=faiss)
        t += making[0]
    else:
        v = np.concatenate([v for _, v in clip_like_blocks(n, seed)])
        t = time.perf_counter()
        kidx.write_vectors_index(path, v, names(0, n), model="synthetic", fingerprint="clip-like", faiss=faiss,
                                 images_root=str(Path(path).parent))
    seconds = time.perf_counter() - t
    done.set()
    meta = json.loads((Path(path) / "meta.json").read_text())
    ivf = {k: v for k, v in (meta.get("ivf") or {}).items() if k not in ("parts", "trained")}
    return {"seconds": seconds, "ivf": ivf,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_private": peak_private[0],
            "bytes": sum(s for _, _, s in dir_files(Path(path)).values())}


class StandIn:
    """A model that returns synthetic unit vectors: what add_images costs besides the model."""

    name, fingerprint, dim = "synthetic", "clip-like", DIM

    def __init__(self):
        self.rng = np.random.default_rng(99)

    def preprocess(self, images):
        return np.zeros((len(images), 1), np.float32)

    def encode_pixels(self, pixels):
        z = self.rng.standard_normal((len(pixels), DIM)).astype(np.float32)
        return z / np.linalg.norm(z, axis=1, keepdims=True)


def add_photos(path: str, photos: str) -> dict:
    import faiss  # noqa: F401 - imported before the clock starts, as in any process that searches

    from koclip import index as kidx

    before, io0 = dir_files(Path(path)), proc_io()
    t = time.perf_counter()
    report = kidx.add_images(path, StandIn(), photos, progress=False)
    seconds = time.perf_counter() - t
    io1, after = proc_io(), dir_files(Path(path))
    written = sum(size for name, (ino, mtime, size) in after.items() if before.get(name, (0, 0))[:2] != (ino, mtime))
    return {"seconds": seconds, "indexed": report.indexed, "count": report.count, "new_file_bytes": written,
            "write_bytes": io1["write_bytes"] - io0["write_bytes"], "wchar": io1["wchar"] - io0["wchar"]}


def upgrade(path: str) -> dict:
    from koclip import index as kidx

    io0 = proc_io()
    t = time.perf_counter()
    kidx.upgrade_index(path)
    return {"seconds": time.perf_counter() - t, "write_bytes": proc_io()["write_bytes"] - io0["write_bytes"]}


def exact_truth(path: str, queries: str, out: str) -> dict:
    """Exact top-10 row numbers of the queries: streamed over the segments (format 2, so that the
    vectors need not fit in memory), else with the library's exact search."""
    from koclip import index as kidx

    q = np.load(queries)
    if hasattr(kidx, "write_segment_file"):
        from koclip.index.ivf import _ExactTopK

        index = kidx.load_index(path, on_disk=True)
        top = _ExactTopK(q / np.linalg.norm(q, axis=1, keepdims=True), 10)
        for vectors, ids in index.blocks(0, index.stored_rows):
            top.add(vectors.astype(np.float32), ids)
        np.save(out, top.ids())
    else:
        index = kidx.load_index(path)
        hits = index.search(q, k=10, backend="exact")
        np.save(out, np.array([[int(h.path[:8]) for h in row] for row in hits]))
    return {}


def search(path: str, queries: str, truth: str, on_disk: bool | None, max_mapped: int | None = None) -> dict:
    """Load, RSS, cold and warm one-query latency, recall@10 and exact latency, in this process.
    max_mapped: load_index's limit on the IVF's mapped pages (None: its default)."""
    import inspect

    import faiss  # noqa: F401 - loaded before the baseline, as any search process has it

    from koclip import index as kidx

    drop_page_cache(Path(path))
    q = np.load(queries)
    want = np.load(truth)
    base = proc_status()
    kw = {"on_disk": on_disk} if "on_disk" in inspect.signature(kidx.load_index).parameters else {}
    if max_mapped is not None:
        kw["max_mapped"] = max_mapped
    t = time.perf_counter()
    index = kidx.load_index(path, **kw)
    load_s = time.perf_counter() - t
    loaded = proc_status()
    cold = []
    for x in q[:5]:  # the first queries read their lists from disk (or, in memory, the IVF file)
        t = time.perf_counter()
        index.search(x, k=10, backend="faiss")
        cold.append(time.perf_counter() - t)
    first = proc_status()  # what 5 queries brought in: the lists they visited
    warm = []
    hits = []
    peak_rss = 0
    for x in q:
        t = time.perf_counter()
        hits.append(index.search(x, k=10, backend="faiss"))
        warm.append(time.perf_counter() - t)
        peak_rss = max(peak_rss, proc_status()["VmRSS"] - base["VmRSS"])
    after = proc_status()
    pages = getattr(index, "mapped_pages", None)
    ab = {}
    if pages is not None and max_mapped is None:
        # The limit's cost in latency, under the same load: the same queries taking turns between
        # this index and a second copy whose mapped pages are never handed back.
        unlimited = kidx.load_index(path, on_disk=True, max_mapped=1 << 60)
        for x in q:
            unlimited.search(x, k=10, backend="faiss")
        ab = {"limited": [], "unlimited": []}
        for x in q:
            for name, ix in (("limited", index), ("unlimited", unlimited)):
                t = time.perf_counter()
                ix.search(x, k=10, backend="faiss")
                ab[name].append(time.perf_counter() - t)
        ab = {f"ab_{k}_ms": 1e3 * float(np.median(v)) for k, v in ab.items()}
    recall = float(np.mean([len({int(h.path[:8]) for h in got} & set(w.tolist())) / 10
                            for got, w in zip(hits, want)]))
    fp16 = index.count * index.dim * 2
    return {"n": index.count, "format": getattr(index, "format_version", 1),
            "on_disk": getattr(index, "on_disk", False),
            "load_s": load_s, "cold_ms": 1e3 * float(np.median(cold)), "warm_ms": 1e3 * float(np.median(warm)),
            "recall": recall, "nprobe": index.ivf_params["nprobe"], "nlist": index.ivf_params["nlist"],
            "rss_load": loaded["VmRSS"] - base["VmRSS"], "anon_after": after["RssAnon"] - base["RssAnon"],
            "file_after": after["RssFile"] - base["RssFile"], "rss_after": after["VmRSS"] - base["VmRSS"],
            "file_first": first["RssFile"] - base["RssFile"], "rss_first": first["VmRSS"] - base["VmRSS"],
            "fp16_bytes": fp16, "peak_rss": peak_rss,
            "mapped_limit": pages.limit if pages else None, "releases": pages.releases if pages else 0, **ab}


def read_vectors(path: str, cold: bool) -> dict:
    """Seconds to read an index's vectors into memory (Index.vectors), from disk if `cold`."""
    from koclip import index as kidx

    if cold:
        drop_page_cache(Path(path))
    index = kidx.load_index(path, on_disk=True)
    t = time.perf_counter()
    v = index.vectors
    return {"seconds": time.perf_counter() - t, "bytes": int(v.nbytes),
            "files": sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())}


WORKERS = {"read_vectors": read_vectors, "write_index": write_index, "add_photos": add_photos, "upgrade": upgrade, "exact_truth": exact_truth,
           "search": search}


# ---------------------------------------------------------------- the driver

def run_worker(task: str, code_root: Path, **kwargs) -> dict:
    """Run WORKERS[task](**kwargs) in a fresh Python whose koclip is the one under `code_root`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code_root), str(HERE)]))
    out = subprocess.run([sys.executable, __file__, "--worker", task, json.dumps(kwargs)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {task} ({code_root}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def v1_tree(rev: str, workdir: Path) -> Path:
    """koclip as of git revision `rev` (format 1), unpacked from `git archive`."""
    root = workdir / f"koclip-{rev}"
    if not root.exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "koclip"], capture_output=True, check=True)
        root.mkdir(parents=True)
        with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
            tar.extractall(root, filter="data")
    return root


def tiny_photos(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"new{i:05d}.png")


def mb(x) -> str:
    return f"{x / 2**20:,.1f} MB"


def bench_add(args, workdir: Path) -> None:
    v1 = v1_tree(args.v1_rev, workdir)
    photos = workdir / "photos"
    tiny_photos(photos, args.add)
    print(f"\n## add {args.add:,} photos to an index of {args.n:,} x {DIM} fp16 vectors with an IVF", flush=True)
    results = {}
    for name, code in (("format 1", v1), ("format 2", REPO)):
        path = workdir / f"add-{name[-1]}.kidx"
        shutil.rmtree(path, ignore_errors=True)
        made = run_worker("write_index", code, path=str(path), n=args.n, seed=1, faiss=True)
        results[name] = r = run_worker("add_photos", code, path=str(path), photos=str(photos))
        print(f"{name}: index written in {made['seconds']:.0f} s ({mb(made['bytes'])}); add {r['seconds']:.2f} s, "
              f"new files in the index {mb(r['new_file_bytes'])}, process wrote {mb(r['write_bytes'])} "
              f"(write() calls: {mb(r['wchar'])}); {r['indexed']} added, {r['count']:,} rows", flush=True)
    one, two = results["format 1"], results["format 2"]
    print(f"format 2 / format 1: {two['seconds'] / one['seconds']:.3f} of the time, "
          f"{two['new_file_bytes'] / one['new_file_bytes']:.5f} of the bytes", flush=True)
    up = run_worker("upgrade", REPO, path=str(workdir / "add-1.kidx"))
    print(f"upgrade of the format-1 index ({args.n + args.add:,} rows): {up['seconds']:.1f} s, "
          f"wrote {mb(up['write_bytes'])}", flush=True)
    if not args.keep:
        for name in ("add-1.kidx", "add-2.kidx"):
            shutil.rmtree(workdir / name, ignore_errors=True)


def bench_read(args, workdir: Path) -> None:
    path = workdir / f"read-{args.n}.kidx"
    shutil.rmtree(path, ignore_errors=True)
    run_worker("write_index", REPO, path=str(path), n=args.n, seed=5, faiss=False)
    print(f"\n## read the vectors of an index of {args.n:,} x {DIM} fp16 vectors into memory", flush=True)
    for cold in (True, False, True, False, True, False):
        r = run_worker("read_vectors", REPO, path=str(path), cold=cold)
        print(f"{'from disk' if cold else 'from the page cache'}: {r['seconds']:.2f} s, "
              f"{r['bytes'] / r['seconds'] / 1e6:.0f} MB/s of vectors ({r['files'] / r['seconds'] / 1e6:.0f} MB/s of "
              f"files); load average {os.getloadavg()[0]:.1f}", flush=True)
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)


def bench_search(args, workdir: Path) -> None:
    rows = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    v1_sizes = [int(s) for s in args.v1_sizes.split(",") if s]
    for fmt, n in [(2, n) for n in sizes] + [(1, n) for n in v1_sizes]:
        code = REPO if fmt == 2 else v1_tree(args.v1_rev, workdir)
        path = workdir / f"search-{fmt}-{n}.kidx"
        shutil.rmtree(path, ignore_errors=True)
        made = run_worker("write_index", code, path=str(path), n=n, seed=n, faiss=True)
        queries = workdir / f"q-{n}.npy"
        np.save(queries, np.concatenate([v for _, v in clip_like_blocks(args.queries, seed=n + 1)]).astype(np.float32))
        truth = workdir / f"truth-{n}.npy"
        run_worker("exact_truth", code, path=str(path), queries=str(queries), out=str(truth))
        r = run_worker("search", code, path=str(path), queries=str(queries), truth=str(truth),
                       on_disk=True if fmt == 2 else None)
        r.update(build_s=made["seconds"], ivf_s=made["ivf"].get("build_seconds"), build_peak_rss=made["peak_rss"],
                 peak_private=made["peak_private"], disk=made["bytes"])
        rows.append(r)
        limits = ""
        if r["mapped_limit"] is not None:
            # The same searches with the IVF's mapped pages never handed back: what the limit costs.
            u = run_worker("search", code, path=str(path), queries=str(queries), truth=str(truth), on_disk=True,
                           max_mapped=1 << 60)
            limits = (f"; mapped-page limit {mb(r['mapped_limit'])}: {r['releases']} releases, peak RSS during the "
                      f"warm queries +{mb(r['peak_rss'])} ({r['peak_rss'] / r['fp16_bytes']:.3f}x fp16); with no "
                      f"limit: warm {u['warm_ms']:.2f} ms, peak RSS +{mb(u['peak_rss'])} "
                      f"({u['peak_rss'] / u['fp16_bytes']:.3f}x fp16); taking turns, once all lists are mapped: "
                      f"{r['ab_limited_ms']:.2f} ms with the limit, {r['ab_unlimited_ms']:.2f} ms without")
        print(f"format {fmt}, n {n:,}: write+IVF {r['build_s']:.0f} s (IVF {r['ivf_s']:.0f} s), build peak RSS "
              f"{mb(r['build_peak_rss'])} (private {mb(r['peak_private'])}), on disk {mb(r['disk'])}; load "
              f"{r['load_s']:.2f} s, RSS +{mb(r['rss_load'])}; "
              f"IVF {r['nlist']}/{r['nprobe']}: cold {r['cold_ms']:.1f} ms, warm {r['warm_ms']:.2f} ms, "
              f"recall@10 {r['recall']:.3f}; after 5 queries RSS +{mb(r['rss_first'])} (file pages "
              f"+{mb(r['file_first'])}); after {args.queries} more private +{mb(r['anon_after'])}, "
              f"mapped file pages +{mb(r['file_after'])}; fp16 vectors {mb(r['fp16_bytes'])} "
              f"(private/fp16 {r['anon_after'] / r['fp16_bytes']:.3f}, all resident/fp16 "
              f"{r['rss_after'] / r['fp16_bytes']:.3f}){limits}", flush=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](**json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("add", "search", "read", "all"))
    ap.add_argument("--n", type=int, default=1_000_000, help="index size for the add benchmark")
    ap.add_argument("--add", type=int, default=1000, help="photos to add")
    ap.add_argument("--sizes", default="1000000,10000000", help="index sizes for the search benchmark (format 2)")
    ap.add_argument("--v1-sizes", default="1000000", help="index sizes for the search benchmark in format 1")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--v1-rev", default="c33ff33", help="git revision whose koclip writes format 1")
    ap.add_argument("--dir", default=None, help="working folder (default: a temp dir); needs ~2.2 KB a vector")
    ap.add_argument("--keep", action="store_true", help="keep the indexes")
    args = ap.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="koclip-index-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import faiss

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; faiss {faiss.__version__}; "
          f"disk free {shutil.disk_usage(workdir).free / 2**30:.0f} GiB in {workdir}", flush=True)
    try:
        if args.what in ("add", "all"):
            bench_add(args, workdir)
        if args.what in ("search", "all"):
            bench_search(args, workdir)
        if args.what in ("read", "all"):
            bench_read(args, workdir)
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
