"""Search latency, recall and memory of koclip.index on synthetic 512-d embeddings.

For each size (100k and 1M; --quick: 100k only) it writes an index of
synthetic L2-normalised fp16 vectors, then measures in this process:

    load       load_index(on_disk=False) time and RSS growth (the vectors, held once, by faiss);
               benchmarks/index_scale.py measures the IVF kept on disk, and adds
    exact      one-query top-10 latency, brute force over every vector (median of --queries)
    ivf build  faiss IVF train + add + nprobe calibration time, and its RSS growth
    ivf        one-query top-10 latency with the calibrated nprobe, and recall@10 vs exact

Data ("--data"):
    clip-like  vectors on a 64-dim subspace with a decaying spectrum plus a little
               isotropic noise, queries drawn the same way (not copies of stored
               vectors): like real CLIP embeddings, which have low intrinsic dimension.
    uniform    uniformly random directions in 512-d, the worst case for any
               approximate index (no neighbourhood structure at all).

    python benchmarks/index_search.py [--quick] [--data clip-like,uniform] [--queries 200] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from koclip import index as kidx

DIM = 512


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic(kind: str, n: int, seed: int, block: int = 100_000) -> np.ndarray:
    """(n, DIM) float16 unit vectors, generated block by block (no full float32 copy)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(12345).standard_normal((DIM, 64)))[0].astype(np.float32)
    spectrum = (1.0 / np.sqrt(np.arange(1, 65))).astype(np.float32)
    out = np.empty((n, DIM), np.float16)
    for start in range(0, n, block):
        m = min(block, n - start)
        if kind == "uniform":
            x = rng.standard_normal((m, DIM), dtype=np.float32)
        else:
            x = (rng.standard_normal((m, 64), dtype=np.float32) * spectrum) @ basis.T
            x += 0.02 * rng.standard_normal((m, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def median_ms(fn, queries: np.ndarray) -> float:
    fn(queries[0])  # warm up
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def run(kind: str, n: int, n_queries: int, workdir: Path) -> dict:
    path = workdir / f"{kind}-{n}.kidx"
    vectors = synthetic(kind, n, seed=n)
    t = time.perf_counter()
    kidx.write_vectors_index(path, vectors, [f"{i:08d}.jpg" for i in range(n)], model="synthetic",
                             fingerprint=kind, faiss=False)
    write_s = time.perf_counter() - t
    del vectors
    queries = synthetic(kind, n_queries, seed=n + 1).astype(np.float32)

    rss0 = rss_bytes()
    t = time.perf_counter()
    index = kidx.load_index(path, on_disk=False)  # vectors and IVF in memory (index_scale.py: on disk)
    load_s = time.perf_counter() - t
    rss_load = rss_bytes() - rss0
    exact_ms = median_ms(lambda q: index.search(q, k=10, backend="exact"), queries[:50])
    truth = index.search(queries, k=10, backend="exact")

    rss1 = rss_bytes()
    t = time.perf_counter()
    index.search(queries[0], k=10, backend="faiss")  # builds, calibrates and saves the IVF
    ivf_build_s = time.perf_counter() - t
    rss_ivf = rss_bytes() - rss1
    ivf_ms = median_ms(lambda q: index.search(q, k=10, backend="faiss"), queries)
    approx = index.search(queries, k=10, backend="faiss")
    recall = float(np.mean([len({h.path for h in a} & {h.path for h in e}) / 10 for a, e in zip(approx, truth)]))
    p = index.ivf_params
    del index
    shutil.rmtree(path)
    return {"data": kind, "n": n, "write_s": write_s, "load_s": load_s, "rss_load_mb": rss_load / 2**20,
            "exact_ms": exact_ms, "ivf_build_s": ivf_build_s, "rss_ivf_mb": rss_ivf / 2**20, "ivf_ms": ivf_ms,
            "recall": recall, "nlist": p["nlist"], "nprobe": p["nprobe"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k vectors only")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default 100000,1000000)")
    ap.add_argument("--data", default="clip-like", help="clip-like, uniform, or both comma-separated")
    ap.add_argument("--queries", type=int, default=200, help="queries for latency medians and recall")
    ap.add_argument("--dir", default=None, help="where to write the indexes (default: a temp dir)")
    args = ap.parse_args()
    sizes = [100_000] if args.quick else [int(s) for s in (args.sizes or "100000,1000000").split(",")]
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="koclip-index-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import faiss

    print(f"cpus: {os.cpu_count()}, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f}; dim {DIM}, float16 storage, top-10, {args.queries} queries")
    head = (f"{'data':10s} {'n':>9s} | {'load s':>6s} {'RSS MB':>7s} | {'exact ms':>8s} | {'IVF build s':>11s} "
            f"{'RSS MB':>7s} {'nlist':>5s} {'nprobe':>6s} | {'IVF ms':>6s} {'recall@10':>9s}")
    print(head)
    print("-" * len(head))
    try:
        for kind in args.data.split(","):
            for n in sizes:
                r = run(kind, n, args.queries, workdir)
                print(f"{r['data']:10s} {r['n']:9,d} | {r['load_s']:6.2f} {r['rss_load_mb']:7.0f} | "
                      f"{r['exact_ms']:8.1f} | {r['ivf_build_s']:11.1f} {r['rss_ivf_mb']:7.0f} {r['nlist']:5d} "
                      f"{r['nprobe']:6d} | {r['ivf_ms']:6.2f} {r['recall']:9.3f}", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
