"""`koclip eval zeroshot --model M --dataset D` and `koclip eval retrieval --model M --dataset D`.

Both print a table; `--json` and `--csv` also write the results to files.
"""

from __future__ import annotations

import csv
import io
import json
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


def _left(text: str, width: int) -> str:
    """`text` padded to `width` terminal columns: Hangul and other wide characters take two."""
    columns = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(width - columns, 0)


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
