"""`koclip index ...`: build, add to, merge, inspect and search image-embedding indexes.

    koclip index build --model NAME --images DIR --out PATH [--shard i/n] [--batch-size N]
                       [--dtype float16|float32] [--workers N] [--faiss auto|yes|no] [--no-progress]
    koclip index add --model NAME INDEX PATH...      add image files or folders
    koclip index remove INDEX [PATH...] [--missing]  remove images (by path, or those whose file is gone)
    koclip index merge OUT PART...                   join shards built by the same model
    koclip index compact INDEX                       rewrite as one segment, dropping deleted rows
    koclip index upgrade INDEX                       convert a format-1 index to format 2, in place
    koclip index info INDEX                          model, counts, segments, settings
    koclip index search INDEX TEXT... [-k 10] [--backend auto|exact|faiss]

The model NAME is resolved with `koclip.load_embedder`.
"""

from __future__ import annotations

import argparse
import json

import koclip
from koclip import index as kidx
from koclip.errors import IndexFileError, KoclipError


def _print_report(report: kidx.BuildReport, limit: int = 20, *, ray: bool = False) -> None:
    """ray: the report of an --engine ray build, whose model_busy is per model actor."""
    r = report
    print(f"{r.out_path}: {r.count} images in the index; {r.indexed} written by this run, "
          f"{r.resumed} resumed from an interrupted run, in {r.seconds:.1f} s")
    if r.embedded:
        # Below ~85% busy on a long run, decoding images is the bottleneck, not the model.
        slow_loading = r.model_busy < 0.85 and r.embedded >= 1000
        busy = f"the model actors were busy {100 * r.model_busy:.0f}% of the time each, on average" if ray \
            else f"the model was busy {100 * r.model_busy:.0f}% of the time"
        hint = " (image loading held them back)" if ray else " (image loading held it back: try more --workers)"
        print(f"embedded {r.embedded} images at {r.images_per_second:.1f} img/s; {busy}"
              + (hint if slow_loading else ""))
    _print_pairs(r.skipped, f"{len(r.skipped)} unreadable images skipped:", "{}: {}", limit)
    _print_pairs(r.duplicates, f"{len(r.duplicates)} duplicates (same bytes as an indexed file) not stored again",
                 "{} = {}", limit)


def _print_pairs(pairs, heading: str, fmt: str, limit: int) -> None:
    """Prints a heading and at most `limit` (a, b) pairs, then how many were left out."""
    if not pairs:
        return
    print(heading)
    for a, b in pairs[:limit]:
        print("  " + fmt.format(a, b))
    if len(pairs) > limit:
        print(f"  ... and {len(pairs) - limit} more")


_FAISS = {"auto": "auto", "yes": True, "no": False}


def _shard(text: str):
    try:
        return kidx.parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"needs a number of seconds >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}")
    return int(text)


def _build(args) -> int:
    report = kidx.build_index(
        koclip.load_embedder(args.model), args.images, args.out, batch_size=args.batch_size, shard=args.shard,
        progress=not args.no_progress, num_workers=args.workers, dtype=args.dtype, faiss=_FAISS[args.faiss],
        lock_wait=args.wait, engine=args.engine, ray_address=args.address, ray_actors=args.actors)
    _print_report(report, ray=args.engine == "ray")
    return 0


def _add(args) -> int:
    report = kidx.add_images(args.index, koclip.load_embedder(args.model), args.paths, batch_size=args.batch_size,
                             progress=not args.no_progress, num_workers=args.workers, lock_wait=args.wait)
    _print_report(report)
    return 0


def _remove(args) -> int:
    if not args.paths and not args.missing:
        raise SystemExit("koclip index remove: give the paths to remove, or --missing (or both)")
    try:
        done = kidx.remove_images(args.index, args.paths, missing=args.missing, lock_wait=args.wait)
    except ValueError as e:
        raise SystemExit(f"koclip index remove: {e}") from None
    for p in done.paths[:20]:
        print(f"removed {p}")
    if len(done.paths) > 20:
        print(f"... and {len(done.paths) - 20} more")
    n = len(done.paths)
    print(f"{args.index}: {n} image{'' if n == 1 else 's'} removed, {done.count} left")
    return 0


def _merge(args) -> int:
    report = kidx.merge_indexes(args.parts, args.out, dtype=args.dtype, faiss=_FAISS[args.faiss],
                                lock_wait=args.wait)
    _print_report(report)
    return 0


def _compact(args) -> int:
    done = kidx.compact_index(args.index, lock_wait=args.wait)
    if done.segments == 1 and not done.dropped:
        print(f"{args.index}: already one segment with no deleted rows; nothing to do")
    else:
        print(f"{args.index}: {done.count} images in 1 segment (was {done.segments} segments; "
              f"{done.dropped} deleted rows dropped)")
    return 0


def _upgrade(args) -> int:
    if kidx.upgrade_index(args.index, lock_wait=args.wait):
        print(f"{args.index}: upgraded to format 2 (Parquet segments); koclip before format 2 cannot read it")
    else:
        print(f"{args.index}: already format 2; nothing to do")
    return 0


def _info(args) -> int:
    index = kidx.load_index(args.index, on_disk=True)  # the vectors are not needed
    meta = dict(index.meta, images_root=str(index.root))  # where the photos are found now
    info = {k: meta[k] for k in ("format_version", "model", "fingerprint", "dim", "dtype", "count", "created",
                                 "updated", "images_root") if k in meta}
    info["format_version"] = index.format_version
    if index.format_version >= 2:
        info.update(segments=index.segments, deleted_rows=index.deleted,
                    bytes=sum(e["bytes"] for e in meta["segments"] + meta["deletions"]))
    ivf = meta.get("ivf")
    if ivf:
        info["ivf"] = {k: v for k, v in ivf.items() if k not in ("parts", "trained")}
        if "parts" in ivf:
            info["ivf"].update(parts=len(ivf["parts"]), bytes=sum(p["bytes"] for p in ivf["parts"]))
    else:
        info["ivf"] = None
    print(json.dumps(info, indent=1, ensure_ascii=False))
    if index.format_version < 2:
        print(f"# format 1: read-only; `koclip index upgrade {args.index}` converts it")
    elif index.deleted > index.count or index.segments > 64:
        print(f"# {index.deleted} deleted rows in {index.segments} segments: `koclip index compact {args.index}` "
              "rewrites it without them")
    return 0


def _search(args) -> int:
    if any(not t.strip() for t in args.text):
        raise KoclipError("a search query is empty; give some words to search for, e.g. \"바닷가의 일몰\"")
    index = kidx.load_index(args.index)
    name = args.model or index.model
    if name != index.model:
        raise IndexFileError(f"index {args.index} was built with model {index.model!r}, not {name!r}; "
                             f"search it with --model {index.model}")
    embedder = koclip.load_embedder(name)
    if embedder.fingerprint != index.fingerprint:
        raise IndexFileError(f"index {args.index} was built with a different configuration of {name!r} "
                             f"(fingerprint {index.fingerprint}, loaded {embedder.fingerprint}); rebuild it")
    ztxt = embedder.encode_texts(list(args.text))
    for text, hits in zip(args.text, index.search(ztxt, k=args.k, backend=args.backend)):
        print(f"# {text}")
        for h in hits:
            print(f"{h.rank:3d}  {h.score:.4f}  {index.full_path(h.path)}")
    return 0


def register(subparsers) -> None:
    """Add `index` and its subcommands to the `koclip` command's subparsers."""
    p = subparsers.add_parser("index", help="image-embedding indexes for text-to-image search")
    sub = p.add_subparsers(dest="index_command", required=True)

    def writer(q):
        q.add_argument("--wait", type=_seconds, default=kidx.LOCK_WAIT_SECONDS, metavar="SECONDS",
                       help="while another koclip process writes to the same index, wait this long for it "
                            f"(default {kidx.LOCK_WAIT_SECONDS:g}), then give up; 0: give up at once")

    def common(q, *, workers=True):
        q.add_argument("--batch-size", type=_positive, default=32, help="images per model call (default 32)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if workers:
            q.add_argument("--workers", type=_positive, default=2, help="image decoding threads (default 2)")

    q = sub.add_parser("build", help="embed every image in a folder (resumable)")
    q.add_argument("--model", required=True, help="model name, e.g. koclip-mini")
    q.add_argument("--images", required=True, help="folder scanned recursively for images")
    q.add_argument("--out", required=True, help="index directory to write, e.g. photos.kidx")
    q.add_argument("--shard", type=_shard, help="i/n: build only part i of n (1-based); join parts with 'merge'")
    q.add_argument("--dtype", choices=kidx.DTYPES, default="float16", help="vector storage (default float16)")
    q.add_argument("--faiss", choices=sorted(_FAISS), default="auto",
                   help=f"build the approximate-search index (auto: at >= {kidx.FAISS_THRESHOLD:,} images)")
    q.add_argument("--engine", choices=kidx.ENGINES, default="local",
                   help="local: this process embeds (default); ray: Ray Data tasks read the images and model "
                        "actors embed them on a Ray cluster (needs `pip install koclip[ray]`; every node must "
                        "read the images at the same path)")
    q.add_argument("--address", help="with --engine ray: the cluster, e.g. 10.0.0.5:6379 or auto "
                                     "(default: $RAY_ADDRESS, else a Ray started for this build)")
    q.add_argument("--actors", type=_positive, help="with --engine ray: model actors (default: one per "
                                                    "cluster CPU)")
    common(q)
    writer(q)
    q.set_defaults(func=_build)

    q = sub.add_parser("add", help="add image files or folders to an index")
    q.add_argument("--model", required=True, help="the model the index was built with")
    q.add_argument("index")
    q.add_argument("paths", nargs="+", help="image files, or one folder")
    common(q)
    writer(q)
    q.set_defaults(func=_add)

    q = sub.add_parser("remove", help="remove images from an index")
    q.add_argument("index")
    q.add_argument("paths", nargs="*", help="stored paths (as search prints them) or image files")
    q.add_argument("--missing", action="store_true", help="also remove every image whose file is gone")
    writer(q)
    q.set_defaults(func=_remove)

    q = sub.add_parser("merge", help="join indexes built by the same model (e.g. shards)")
    q.add_argument("out")
    q.add_argument("parts", nargs="+")
    q.add_argument("--dtype", choices=kidx.DTYPES, default=None, help="default: the first part's")
    q.add_argument("--faiss", choices=sorted(_FAISS), default="auto")
    writer(q)
    q.set_defaults(func=_merge)

    q = sub.add_parser("compact", help="rewrite an index as one segment, dropping removed and replaced rows")
    q.add_argument("index")
    writer(q)
    q.set_defaults(func=_compact)

    q = sub.add_parser("upgrade", help="convert a format-1 index (vectors .npy + items .json) to format 2")
    q.add_argument("index")
    writer(q)
    q.set_defaults(func=_upgrade)

    q = sub.add_parser("info", help="show an index's model, size and settings")
    q.add_argument("index")
    q.set_defaults(func=_info)

    q = sub.add_parser("search", help="find images for text queries")
    q.add_argument("index")
    q.add_argument("text", nargs="+", help="one or more queries")
    q.add_argument("-k", type=_positive, default=10, help="results per query (default 10)")
    q.add_argument("--model", help="default: the model that built the index")
    q.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto")
    q.set_defaults(func=_search)
