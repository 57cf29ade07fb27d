"""Several models on one benchmark: one row per (model, prompt setting), kept in a results file.

    rows = read_rows(json_path, csv_path)
    rows = compare(["koclip-mini", "koclip-base"], open_benchmark("fashion-mnist"), name="fashion-mnist",
                   lang="ko", prompts=prompt_settings("zeroshot", "ko"), rows=rows,
                   save=lambda rows: write_rows(rows, json_path, csv_path))

A row is keyed by (model, dataset, lang, prompt, limit).  `compare` measures only the rows that
are missing, failed, or were measured with other templates or on other data (`data`, the dataset's
content digest), so a rerun fills in a table without loading the models whose rows are all there;
`redo=True` measures them again.  A model that cannot be loaded or run (no network for a hub model,
an unknown name) gives rows with status "failed" and the error, and the other models still run.

Prompt settings: zero-shot rows are per template set (the bare class name, one template, an
ensemble: each class's text embedding the renormalised mean over its templates); retrieval rows
use the captions as they are, all of each image's captions or only its first (CLIP_benchmark's
protocol for Crossmodal-3600 and XTD10, whose published tables open_clip shows).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from koclip.errors import KoclipError
from koclip.evaluation.datasets import CaptionDataset
from koclip.evaluation.encode import encode_images, subset
from koclip.evaluation.retrieval import score_retrieval
from koclip.evaluation.zeroshot import classifier, score
from koclip.files import atomic_write_text
from koclip.processing import ENGLISH_TEMPLATES, KOREAN_TEMPLATES

log = logging.getLogger(__name__)

RETRIEVAL_METRICS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")
ZEROSHOT_METRICS = ("top1", "top5")
FIELDS = ("model", "dataset", "lang", "prompt", "limit", "status", *RETRIEVAL_METRICS, *ZEROSHOT_METRICS,
          "images", "texts", "classes", "skipped", "templates", "data", "error")
_INTS = ("limit", "images", "texts", "classes", "skipped")


@dataclass(frozen=True)
class Prompt:
    """A prompt setting: its name in the table, the templates of a zero-shot row ('{}' = class name),
    or which captions a retrieval row uses ("all" or "first")."""

    name: str
    templates: tuple[str, ...] = ()
    captions: str = "all"


def zeroshot_prompt(spec: str) -> Prompt:
    """'label' (the bare class name), 'ko' / 'en' (koclip's Korean / English template ensemble), a
    template with '{}', or a file of templates, one per line."""
    if spec == "label":
        return Prompt("label", ("{}",))
    if spec in ("ko", "en"):
        templates = KOREAN_TEMPLATES if spec == "ko" else ENGLISH_TEMPLATES
        return Prompt(f"{spec} ensemble ({len(templates)})", tuple(templates))
    if "{}" in spec:
        return Prompt(spec, (spec,))
    p = Path(spec).expanduser()
    if not p.is_file():
        raise KoclipError(f"--templates {spec!r}: not 'label', 'ko', 'en', a template with '{{}}' "
                          "or a file of templates")
    templates = tuple(ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip())
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise KoclipError(f"{p}: every line must be a template with '{{}}' where the class name goes"
                          + (f"; {bad[0]!r} has none" if bad else "; the file is empty"))
    return Prompt(f"{p.stem} ({len(templates)})", templates)


def prompt_settings(kind: str, lang: str, templates: Sequence[str] | None = None,
                    captions: Sequence[str] | None = None) -> list[Prompt]:
    """The prompt settings of a table.  Zero-shot default: for Korean the bare label, '이것은 {} 이다'
    and the Korean ensemble; for English the bare label, 'a photo of a {}.' and the English
    ensemble; otherwise the bare label.  Retrieval default: all captions."""
    if kind == "retrieval":
        if templates:
            raise KoclipError("--templates is for zero-shot datasets; retrieval uses the captions as they are "
                              "(--captions all or first)")
        modes = list(dict.fromkeys(captions or ["all"]))
        bad = [m for m in modes if m not in ("all", "first")]
        if bad:
            raise KoclipError(f"--captions {bad[0]!r}: valid: all, first")
        return [Prompt("all captions" if m == "all" else "first caption", captions=m) for m in modes]
    if captions:
        raise KoclipError("--captions is for retrieval datasets; zero-shot rows vary --templates")
    if not templates:
        templates = {"ko": ["label", "이것은 {} 이다", "ko"], "en": ["label", "a photo of a {}.", "en"]}.get(
            lang, ["label"])
    return list({p.name: p for p in map(zeroshot_prompt, templates)}.values())


def row_key(row: dict) -> tuple:
    return (row["model"], row["dataset"], row["lang"], row["prompt"], int(row.get("limit") or 0))


def _reusable(row: dict | None, prompt: Prompt, data: str) -> bool:
    return (row is not None and row.get("status") == "ok" and row.get("data") == data
            and list(row.get("templates") or []) == list(prompt.templates))


def _default_load(name: str):
    from koclip.loading import load

    return load(name)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _measure(model, processor, dataset, prompts, batch_size, progress) -> dict[str, dict]:
    """{prompt name: metrics or {"status": "failed", "error"}}; the images are encoded once for all."""
    zimg, ok = encode_images(model, processor, dataset, batch_size=batch_size, progress=progress,
                             desc="images")
    if not ok.any():
        raise KoclipError(f"none of the {len(ok)} images could be read")
    out = {}
    for p in prompts:
        try:
            if isinstance(dataset, CaptionDataset):
                r = score_retrieval(model, processor, dataset, zimg, ok, captions=p.captions)
                out[p.name] = {**{k: r[k] for k in RETRIEVAL_METRICS}, "images": r["images"],
                               "texts": r["captions"], "skipped": r["skipped"]}
            else:
                r = score(zimg[ok], classifier(model, processor, dataset.classnames, p.templates),
                          dataset.labels[ok], dataset.classnames)
                out[p.name] = {"top1": r["top1"], "top5": r.get("top5"), "images": r["n"],
                               "classes": r["classes"], "skipped": int((~ok).sum())}
        except Exception as e:  # one prompt setting that cannot be scored does not sink the others
            log.debug("scoring %s failed", p.name, exc_info=True)
            out[p.name] = {"status": "failed", "error": _error(e)}
    return out


def compare(models: Sequence[str], dataset, *, name: str, lang: str, prompts: Sequence[Prompt], limit: int = 0,
            rows: Sequence[dict] = (), redo: bool = False, load: Callable | None = None, batch_size: int = 32,
            progress: bool = False, save: Callable[[list[dict]], None] | None = None,
            say: Callable[[str], None] | None = None) -> list[dict]:
    """Measures the rows of `models` x `prompts` on `dataset` that `rows` lacks; returns all rows.

    dataset: a CaptionDataset (retrieval) or ClassDataset (zero-shot), named `name` in the rows.
    limit: a fixed random subset of that many images (0: all).  load(name) -> (model, processor),
    koclip.load by default.  save(rows) is called after each model that was measured.
    """
    load = load or _default_load
    say = say or (lambda msg: None)
    data = dataset.fingerprint()
    store = {row_key(r): dict(r) for r in rows}
    evaluated = None
    for model_name in dict.fromkeys(models):
        base = {"model": model_name, "dataset": name, "lang": lang, "limit": int(limit)}
        todo = [p for p in prompts if redo or not _reusable(store.get(row_key({**base, "prompt": p.name})), p, data)]
        if not todo:
            say(f"{model_name}: all {len(prompts)} rows already measured")
            continue
        if evaluated is None:
            evaluated = subset(dataset, limit)
        say(f"{model_name}: measuring {len(todo)} row(s) on {len(evaluated)} images")
        try:
            model, processor = load(model_name)
            results = _measure(model, processor, evaluated, todo, batch_size, progress)
        except Exception as e:  # e.g. a hub model with no network: a failure row, not an aborted table
            log.debug("%s failed", model_name, exc_info=True)
            say(f"{model_name}: failed: {_error(e)}")
            results = {p.name: {"status": "failed", "error": _error(e)} for p in todo}
        for p in todo:
            row = {**base, "prompt": p.name, "status": "ok", **results[p.name], "templates": list(p.templates),
                   "data": data}
            row.setdefault("error", "")
            store[row_key(row)] = row
        if save is not None:
            save(list(store.values()))
    return list(store.values())


def select(rows: Sequence[dict], models: Sequence[str], *, name: str, lang: str, prompts: Sequence[Prompt],
           limit: int = 0) -> list[dict]:
    """The rows of one table, in models x prompts order (rows not in `rows` are left out)."""
    by_key = {row_key(r): r for r in rows}
    keys = [(m, name, lang, p.name, int(limit)) for m in dict.fromkeys(models) for p in prompts]
    return [by_key[k] for k in keys if k in by_key]


# ---------------------------------------------------------------- the results file


def rows_csv(rows: Sequence[dict]) -> str:
    """Rows as CSV with the columns FIELDS (metrics as fractions; templates as a JSON list)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        cells = {}
        for f in FIELDS:
            v = r.get(f)
            if f == "templates":
                v = json.dumps(list(v or []), ensure_ascii=False)
            elif isinstance(v, float):
                v = f"{v:.6f}"
            cells[f] = "" if v is None else v
        w.writerow(cells)
    return buf.getvalue()


def _from_csv(text: str) -> list[dict]:
    rows = []
    for cells in csv.DictReader(io.StringIO(text)):
        row = {}
        for f, v in cells.items():
            if f is None or v is None or (v == "" and f not in ("error", "prompt")):
                continue
            if f == "templates":
                row[f] = json.loads(v)
            elif f in _INTS:
                row[f] = int(v)
            elif f in RETRIEVAL_METRICS or f in ZEROSHOT_METRICS:
                row[f] = float(v)
            else:
                row[f] = v
        rows.append(row)
    return rows


def read_rows(json_path=None, csv_path=None) -> list[dict]:
    """The rows of an earlier run: from the JSON file if it exists, else from the CSV; [] if neither."""
    for path, parse in ((json_path, lambda t: json.loads(t)["rows"]), (csv_path, _from_csv)):
        if path and Path(path).is_file():
            try:
                rows = parse(Path(path).read_text(encoding="utf-8"))
                return [r for r in rows if isinstance(r, dict) and {"model", "dataset", "lang", "prompt"} <= set(r)]
            except (ValueError, KeyError, TypeError) as e:
                raise KoclipError(f"{path}: not a results file of `koclip eval compare` ({e}); "
                                  "move it away or give another --out") from None
    return []


def write_rows(rows: Sequence[dict], json_path=None, csv_path=None) -> None:
    """Writes the rows as JSON and/or CSV, each file replaced atomically."""
    for path, text in ((json_path, lambda: json.dumps({"rows": list(rows)}, indent=1, ensure_ascii=False) + "\n"),
                       (csv_path, lambda: rows_csv(rows))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text())
