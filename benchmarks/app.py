"""Server time of the demo's three tasks, warm (model loaded, functions compiled).

Two views of each task, median over runs:
- "library": the calls a page makes (koclip_app.support.Engine), with nothing cached
  that a new input would not find cached: a newly uploaded photo is decoded and
  embedded, and the labels / query are new texts every run.
- "page": one rerun of the page script through streamlit's AppTest, entrypoint
  included (sidebar, widgets, chart, image encoding), after a widget changed.

Targets (koclip-mini): image to text with 5 labels <= 150 ms; text to image over
the bundled gallery <= 100 ms; text to patch 3x3 <= 500 ms.

Run:  .venv/bin/python benchmarks/app.py [--model koclip-mini] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS_MS = {"image to text": 150, "text to image": 100, "text to patch": 500}
LABELS = ["고양이", "강아지", "자동차", "커피", "산"]
QUERIES = ["고양이", "바닷가 해변", "우주비행사", "커피 한 잔", "눈 덮인 숲", "빨간 꽃", "오토바이", "달 사진"]


def median_ms(fn, runs: int) -> tuple[float, float]:
    """Runs fn(i) for i in range(runs); returns (median, max) in ms."""
    times = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), max(times)


def library(engine, runs: int) -> dict[str, tuple[float, float]]:
    from koclip.data import gallery_dir
    from koclip.images import open_image

    cat = (gallery_dir() / "cat_chelsea.jpg").read_bytes()
    mug = open_image(gallery_dir() / "cat_mug.jpg")
    g = engine.gallery()

    def i2t(i):  # a new upload and new label texts (suffix = run number) each time
        image = open_image(cat, max_pixels=25_000_000)
        engine.classify(image, [f"{label}{' ' * (i % 3)}{i}" for label in LABELS], image_key=None)

    def t2i(i):
        engine.search(g.index, f"{QUERIES[i % len(QUERIES)]} {i}", 8)

    def t2p(i):
        engine.patches(mug, f"{QUERIES[i % len(QUERIES)]} {i}", 3, 3)

    out = {}
    for name, fn in (("image to text", i2t), ("text to image", t2i), ("text to patch", t2p)):
        fn(10_000)  # warm: compiles the shapes this task uses
        fn(10_001)
        out[name] = median_ms(fn, runs)
    return out


def page(model: str, runs: int) -> dict[str, tuple[float, float]]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.session_state["model"] = model
    at.run()
    out = {}

    def rerun_with(widget_key, values):
        def go(i):
            at.text_input(key=widget_key).input(values[i % len(values)] + f" {i}").run()
        return go

    at.switch_page("pages/image_to_text.py").run()
    labels = ["\n".join(f"{label} {k}" for label in LABELS) for k in range(len(QUERIES))]

    def i2t(i):
        at.text_area(key="i2t_labels").input(labels[i % len(labels)] + f"\n기타 {i}").run()

    for name, path, fn in (("image to text", "pages/image_to_text.py", i2t),
                           ("text to image", "pages/text_to_image.py", rerun_with("t2i_query", QUERIES)),
                           ("text to patch", "pages/text_to_patch.py", rerun_with("t2p_query", QUERIES))):
        at.switch_page(path).run()
        fn(10_000)
        fn(10_001)
        out[name] = median_ms(fn, runs)
        if at.exception or at.error:
            raise RuntimeError(f"{name}: {[e.value for e in at.exception]} {[e.value for e in at.error]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("KOCLIP_MODEL", "koclip-mini"),
                    help="registry name or checkpoint folder (default koclip-mini)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-page", action="store_true", help="skip the AppTest page reruns")
    args = ap.parse_args()

    import jax

    from koclip_app import ui

    print(f"model {args.model}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs; median (max) of {args.runs} runs, warm")
    t = time.perf_counter()
    engine = ui.shared_engine(args.model)  # the app's own cache, so the page runs reuse it
    print(f"load: {time.perf_counter() - t:.1f} s ({engine.info.source})")
    t = time.perf_counter()
    g = engine.gallery()
    print(f"gallery index: {g.index.count} photos, {g.origin}, {time.perf_counter() - t:.1f} s")
    rows = {"library": library(engine, args.runs)}
    if not args.no_page:
        rows["page"] = page(args.model, args.runs)
    print(f"{'task':16s}{'target':>10s}" + "".join(f"{k:>20s}" for k in rows))
    for task, target in TARGETS_MS.items():
        cells = "".join(f"{rows[k][task][0]:11.0f} ({rows[k][task][1]:4.0f}) ms" for k in rows)
        print(f"{task:16s}{target:7d} ms{cells}")


if __name__ == "__main__":
    main()
