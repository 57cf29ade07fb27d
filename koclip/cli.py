"""The `koclip` command.

    koclip models                         list the registry
    koclip classify IMAGE LABEL...        zero-shot classification of one image (file or URL)
    koclip info [--model NAME]            this machine, and the precision each tower runs in here
    koclip index build|merge|search ...   image-embedding indexes
    koclip train --config configs/NAME.py training (koclip.train)
    koclip eval zeroshot|retrieval ...    evaluation

Subcommands live beside what they drive; each module exposes `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from koclip.errors import KoclipError

# Modules that add subcommands; missing optional ones are skipped.
_SUBCOMMAND_MODULES = ("koclip.index.cli", "koclip.train.cli", "koclip.evaluation.cli")


def _models(args) -> int:
    from koclip import registry

    for name in registry.available_models():
        p = registry.get(name)
        where = "offline" if p.offline else " + ".join(p.sources)
        print(f"{name:16s} {p.description}\n{'':16s} weights: {where}; licence: {p.licence}")
    return 0


def _open_source(source: str):
    """An image from a file path, or from an http(s) URL through koclip.fetch's guarded client."""
    from koclip.images import open_image

    if source.lower().startswith(("http://", "https://")):
        from koclip.fetch import fetch_image

        return fetch_image(source)
    return open_image(source)


def _classify(args) -> int:
    import numpy as np

    import koclip

    # Everything about the input is checked before the model loads (seconds), so a typo fails at once.
    labels, dropped = koclip.processing.clean_labels(args.labels)
    if len(labels) < 2:
        raise KoclipError("give at least two distinct, non-empty labels")
    texts = koclip.apply_template(labels, args.template)
    image = _open_source(args.image)
    if dropped:
        print(f"koclip: ignored {len(dropped)} blank or repeated label(s): {', '.join(map(repr, dropped))}",
              file=sys.stderr)
    model, processor = koclip.load(args.model)
    embedder = koclip.Embedder(model, processor, name=args.model)
    probs = model.label_probabilities(embedder.encode_images([image]), embedder.encode_texts(texts))
    for i in np.argsort(-probs[0]):
        print(f"{probs[0, i] * 100:6.2f}%  {labels[i]}")
    return 0


# CPU flags that decide which low-precision dot products are fast.
_SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _info(args) -> int:
    import koclip
    from koclip import autotune
    from koclip.quantize import cpu_flags

    m = autotune.machine()
    flags = [f for f in _SPEED_FLAGS if f in cpu_flags()]
    ort = f", onnxruntime {m['onnxruntime']}" if m["onnxruntime"] else ", no onnxruntime (pip install 'koclip[onnx]')"
    print(f"machine: {m['cpu']}, {m['cores']} cores ({' '.join(flags) or 'no AVX2'}); "
          f"jax {m['jax']} ({m['backend']}){ort}")
    model, _ = koclip.load(args.model, precision=args.precision)
    info = model.load_info
    print(f"model: {info.name} from {info.source}, loaded in {info.seconds:.1f} s")
    plan = info.precision
    if plan is None:
        print("precision: fp32 (everything float32)")
        return 0
    lines = plan.details()
    print(f"precision: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")
    if plan.timings:
        print(f"  (ms per call on a copy cut to {autotune.TIMING_LAYERS} layers per transformer tower; "
              "score: geometric mean of the times relative to fp32; ort-*: ONNX Runtime)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koclip", description="Korean CLIP in JAX/Flax")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the named models")
    p.set_defaults(func=_models)
    p = sub.add_parser("classify", help="rank labels for one image")
    p.add_argument("image", help="an image file, or an http(s) URL (private addresses are refused)")
    p.add_argument("labels", nargs="+", help="two or more labels, e.g. 고양이 강아지 자동차")
    p.add_argument("--model", default="koclip-mini",
                   help="a name from `koclip models`, a hub id or a local directory (default: koclip-mini)")
    p.add_argument("--template", default="이것은 {} 이다",
                   help="prompt template, {} marks the label (default: '이것은 {} 이다'; '' for none)")
    p.set_defaults(func=_classify)
    p = sub.add_parser("info", help="this machine, and the precision each tower of a model runs in here")
    p.add_argument("--model", default="koclip-mini", help="a name, hub id or local directory (default: koclip-mini)")
    p.add_argument("--precision", default="auto",
                   help="auto (measured once per machine, then remembered), fp32, bf16, int8, ort-fp32 or "
                        "ort-int8 (default: auto)")
    p.set_defaults(func=_info)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # jax probing for a TPU, faiss choosing a SIMD build: not news for a CLI user; and the
        # index commands print their own reports, which koclip.index's INFO lines would repeat.
        for name in ("jax", "faiss", "koclip.index"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except KoclipError as e:
        print(f"koclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("koclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
