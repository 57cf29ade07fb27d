"""`koclip eval zeroshot|retrieval --model M --dataset D` and `koclip eval compare --models A,B --dataset NAME`.

zeroshot and retrieval print a table; `--json` and `--csv` also write the results to files.
compare prints one table of several models on a named benchmark (koclip.evaluation.benchmarks)
and keeps its rows in a CSV and a JSON file, which a rerun fills in.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import unicodedata
from pathlib import Path

from koclip.files import atomic_write_text


def _write_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _templates(arg):
    from koclip.errors import KoclipError
    from koclip.processing import ENGLISH_TEMPLATES, KOREAN_TEMPLATES

    if not arg or arg == "ko":
        return KOREAN_TEMPLATES
    if arg == "en":
        return ENGLISH_TEMPLATES
    p = Path(arg)
    if not p.is_file():
        raise KoclipError(f"--templates {arg!r}: not 'ko', 'en' or a file with one template per line")
    return tuple(ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip())


def _columns(text: str) -> int:
    """Terminal columns of `text`: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _left(text: str, width: int) -> str:
    """`text` padded to `width` terminal columns."""
    return text + " " * max(width - _columns(text), 0)


def zeroshot_table(result: dict) -> str:
    rows = [f"{'class':20s} {'top-1':>7s}"]
    for name, acc in result["per_class"].items():
        rows.append(f"{_left(name, 20)} {'-' if acc is None else f'{acc * 100:6.2f}%':>7s}")
    rows.append("")
    for key in sorted(k for k in result if k.startswith("top")):
        rows.append(f"{key:20s} {result[key] * 100:6.2f}%")
    rows.append(f"{'images':20s} {result['n']:7d}" + (f"  ({result['skipped']} unreadable, skipped)"
                                                       if result["skipped"] else ""))
    return "\n".join(rows)


def zeroshot_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "top1"])
    for name, acc in result["per_class"].items():
        w.writerow([name, "" if acc is None else f"{acc:.6f}"])
    for key in sorted(k for k in result if k.startswith("top")):
        w.writerow([f"overall_{key}", f"{result[key]:.6f}"])
    return buf.getvalue()


def _ks(result: dict, prefix: str) -> list[str]:
    return [k.split("@")[1] for k in result if k.startswith(prefix)]


def retrieval_table(result: dict) -> str:
    ks = _ks(result, "i2t_R@")
    rows = [f"{'direction':14s}" + "".join(f"{'R@' + k:>9s}" for k in ks)]
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        rows.append(f"{label:14s}" + "".join(f"{result[f'{d}_R@{k}'] * 100:8.2f}%" for k in ks))
    rows.append(f"{result['images']} images, {result['captions']} captions"
                + (f", {result['skipped']} unreadable images skipped" if result["skipped"] else ""))
    return "\n".join(rows)


def retrieval_csv(result: dict) -> str:
    ks = _ks(result, "i2t_R@")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["direction"] + [f"R@{k}" for k in ks])
    for d in ("i2t", "t2i"):
        w.writerow([d] + [f"{result[f'{d}_R@{k}']:.6f}" for k in ks])
    return buf.getvalue()


_COMPARE_COLUMNS = {
    "retrieval": (("t2i_R@1", "t2i R@1"), ("t2i_R@5", "R@5"), ("t2i_R@10", "R@10"), ("i2t_R@1", "i2t R@1"),
                  ("i2t_R@5", "R@5"), ("i2t_R@10", "R@10"), ("images", "images"), ("texts", "texts")),
    "zeroshot": (("top1", "top-1"), ("top5", "top-5"), ("images", "images"), ("classes", "classes")),
}


def compare_table(rows: list[dict], kind: str) -> str:
    """One line per row of `koclip eval compare`: percentages, or the error of a failed row."""
    cols = _COMPARE_COLUMNS[kind]
    mw = max([5] + [_columns(r["model"]) for r in rows])
    pw = max([6] + [_columns(r["prompt"]) for r in rows])
    lines = [_left("model", mw) + "  " + _left("prompt", pw) + "".join(f"{label:>9s}" for _, label in cols)]
    for r in rows:
        start = _left(r["model"], mw) + "  " + _left(r["prompt"], pw)
        if r.get("status") != "ok":
            err = (r.get("error") or "unknown error").splitlines()[0]
            lines.append(f"{start}  failed: {err[:100] + '...' if len(err) > 100 else err}")
            continue
        cells = [f"{'-':>9s}" if r.get(k) is None else f"{r[k] * 100:8.2f}%" if isinstance(r[k], float)
                 else f"{r[k]:9d}" for k, _ in cols]
        lines.append(start + "".join(cells))
    if kind == "retrieval":
        lines.append("t2i: a caption finds its image among all images; i2t: an image finds one of its captions")
    return "\n".join(lines)


def _emit(args, result, table, to_csv) -> None:
    print(table(result))
    if args.json:
        _write_atomic(args.json, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.csv:
        _write_atomic(args.csv, to_csv(result))


def _zeroshot(args) -> int:
    import koclip
    from koclip.evaluation.datasets import ClassDataset, open_dataset
    from koclip.evaluation.zeroshot import evaluate_zeroshot
    from koclip.errors import KoclipError

    templates = _templates(args.templates)
    ds = open_dataset(args.dataset, split=args.split, classnames=args.classnames, templates=templates)
    if not isinstance(ds, ClassDataset):
        raise KoclipError(f"{args.dataset}: zero-shot needs labelled images (an IDX folder, class folders "
                          "or fashion-mnist), not a caption file; use `koclip eval retrieval` for that")
    model, processor = koclip.load(args.model)
    result = evaluate_zeroshot(model, processor, ds, templates=templates, limit=args.limit,
                               batch_size=args.batch_size, progress=not args.quiet)
    result = {"model": args.model, "dataset": args.dataset, "split": args.split, **result}
    _emit(args, result, zeroshot_table, zeroshot_csv)
    return 0


def _retrieval(args) -> int:
    import koclip
    from koclip.evaluation.datasets import CaptionDataset, open_dataset
    from koclip.evaluation.retrieval import evaluate_retrieval
    from koclip.errors import KoclipError

    ds = open_dataset(args.dataset, split=args.split, image_root=args.image_root)
    if not isinstance(ds, CaptionDataset):
        ds_kind = type(ds).__name__
        raise KoclipError(f"{args.dataset}: retrieval needs a caption file (.jsonl or KoCLIP .json), "
                          f"not a {ds_kind}")
    model, processor = koclip.load(args.model)
    result = evaluate_retrieval(model, processor, ds, limit=args.limit, batch_size=args.batch_size,
                                progress=not args.quiet)
    result = {"model": args.model, "dataset": args.dataset, **result}
    _emit(args, result, retrieval_table, retrieval_csv)
    return 0


def _compare_paths(args) -> tuple[Path | None, Path | None]:
    if args.json or args.csv:
        return (Path(args.json) if args.json else None), (Path(args.csv) if args.csv else None)
    stem = Path(args.out) / f"compare-{args.dataset}-{args.lang}"
    return stem.with_suffix(".json"), stem.with_suffix(".csv")


def _compare(args) -> int:
    from koclip.errors import KoclipError
    from koclip.evaluation.benchmarks import BENCHMARKS, open_benchmark
    from koclip.evaluation.compare import compare, prompt_settings, read_rows, select, write_rows

    bench = BENCHMARKS.get(args.dataset)
    if bench is None:
        raise KoclipError(f"--dataset {args.dataset!r}: valid: {', '.join(BENCHMARKS)}")
    models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    if not models:
        raise KoclipError("--models: give one or more model names, separated by commas")
    if args.limit < 0:
        raise KoclipError(f"--limit {args.limit}: give 0 (all images) or a positive number")
    captions = [c.strip() for c in args.captions.split(",")] if args.captions else None
    prompts = prompt_settings(bench.kind, args.lang, args.templates, captions)
    json_path, csv_path = _compare_paths(args)
    rows = read_rows(json_path, csv_path)  # before the dataset, so a bad results file fails at once
    ds = open_benchmark(args.dataset, lang=args.lang, data_dir=args.data_dir, image_root=args.image_root,
                        split=args.split, labels=args.labels)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"koclip: {msg}", file=sys.stderr))  # noqa: E731

    def save(rows):
        write_rows(rows, json_path, csv_path)

    rows = compare(models, ds, name=args.dataset, lang=args.lang, prompts=prompts, limit=args.limit, rows=rows,
                   redo=args.redo, batch_size=args.batch_size, progress=not args.quiet, save=save, say=say)
    save(rows)
    n = min(args.limit, len(ds)) if args.limit else len(ds)
    skipped = sum(ds.skipped.values())
    print(f"{bench.title} ({args.dataset}, {args.lang}): {n} of {len(ds)} images"
          + (f", {skipped} left out while reading ({dict(ds.skipped)})" if skipped else ""))
    print(compare_table(select(rows, models, name=args.dataset, lang=args.lang, prompts=prompts,
                               limit=args.limit), bench.kind))
    print("saved " + " and ".join(str(p) for p in (json_path, csv_path) if p))
    return 0


def _common(p) -> None:
    p.add_argument("--model", default="koclip-mini", help="a model name, hub id or checkpoint folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test", help="train or test (IDX datasets)")
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of this many images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--csv", help="also write the results as CSV here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (zero-shot classification, retrieval)")
    sub = p.add_subparsers(dest="eval_command", required=True)
    z = sub.add_parser("zeroshot", help="zero-shot top-1/top-5 accuracy on labelled images",
                       description="dataset: fashion-mnist, a folder holding an IDX gz pair, or a folder "
                                   "with one folder of images per class (+ classnames.txt)")
    _common(z)
    z.add_argument("--classnames", help="class names file: one per line in class order, or folder<TAB>name")
    z.add_argument("--templates", default="ko", help="'ko', 'en' or a file of templates ('{}' = class name)")
    z.set_defaults(func=_zeroshot)
    r = sub.add_parser("retrieval", help="image<->text R@1/5/10 on a caption file",
                       description="dataset: a .jsonl ({image, captions}) or KoCLIP .json caption file")
    _common(r)
    r.add_argument("--image-root", help="folder that relative image paths start from (default: the file's)")
    r.set_defaults(func=_retrieval)
    c = sub.add_parser("compare", help="several models on a named benchmark: one table, saved as CSV and JSON",
                       description="datasets: xm3600 (Crossmodal-3600), xtd10, babel-imagenet, fashion-mnist "
                                   "(docs/evaluation.md says where to download each).  A rerun with the same "
                                   "output measures only the rows that are missing or failed.")
    c.add_argument("--models", required=True, help="comma-separated model names, hub ids or checkpoint folders")
    c.add_argument("--dataset", required=True, help="xm3600, xtd10, babel-imagenet or fashion-mnist")
    c.add_argument("--lang", default="ko", help="language of the captions or class names (default: ko)")
    c.add_argument("--data-dir", help="the downloaded captions / class-name files (fashion-mnist: the IDX folder)")
    c.add_argument("--image-root", help="the images: XM3600 images/, COCO 2014 (train2014/ val2014/), "
                                        "ImageNet val")
    c.add_argument("--labels", help="babel-imagenet with all val images in one folder: LOC_val_solution.csv or "
                                    "'<file> <class index>' lines")
    c.add_argument("--split", default="test", help="fashion-mnist: train or test")
    c.add_argument("--templates", action="append",
                   help="zero-shot prompt setting, repeatable: label, ko, en, a template with {}, or a file; "
                        "default for ko: label, '이것은 {} 이다', ko")
    c.add_argument("--captions", help="retrieval: all (default), first, or all,first")
    c.add_argument("--limit", type=int, default=0, help="a fixed random subset of this many images (0: all)")
    c.add_argument("--out", default="results", help="folder for compare-DATASET-LANG.csv and .json (default: results)")
    c.add_argument("--json", help="the JSON results file (instead of --out)")
    c.add_argument("--csv", help="the CSV results file (instead of --out)")
    c.add_argument("--redo", action="store_true", help="measure every row again")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress")
    c.set_defaults(func=_compare)
