"""Embedding speed on this machine's CPU: koclip (JAX/XLA) next to transformers (PyTorch), same architecture.

For koclip-base's architecture (CLIP ViT-B/32 + roberta-large, random weights)
and for koclip-mini (or, until `koclip.load("koclip-mini")` works, its
architecture with random weights: multilingual-e5-small + EfficientNet-Lite0) it measures

  image throughput  img/s     batch 32, 224x224
  image latency     ms        batch 1
  text throughput   texts/s   batch 32, --text-len tokens
  text latency      ms        batch 1

for koclip in fp32 / bf16 / int8 (`koclip.quantize`) and PyTorch fp32 / bf16
(weights and inputs cast with `.to(torch.bfloat16)`), each side computing
projected, L2-normalised embeddings.  The machine is shared, so every side
runs once per round, in turn, and the table shows the best round (least
disturbed) with the median beside it; ratios compare best rounds.  It also
shows process CPU seconds per call, and ratios by them: wall ratios on a busy
machine also measure how each runtime's threads cope when another job takes
a core, while CPU seconds (the work done) move much less with the load.

Threads: PyTorch runs with torch.set_num_threads(os.cpu_count()); XLA's CPU
client uses one worker per core by default, so both sides get every core.
PyTorch also runs with one thread (its per-op thread hand-offs stall when other
jobs hold the cores), and ratios use the faster of its two settings.

    .venv/bin/python benchmarks/encode.py             # full run
    .venv/bin/python benchmarks/encode.py --quick     # fewer rounds, smaller throughput batch
    .venv/bin/python benchmarks/encode.py --startup   # fresh process -> first embedding, with and
                                                      # without the persistent compilation cache
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JAX_MODES = ("fp32", "bf16", "int8")


# ---------------------------------------------------------------- timing

def race(sides: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Calls every side once per round, in turn, after one warm-up call each.

    Returns (wall seconds, process CPU seconds) per call, by side.  CPU seconds
    count the work a side did on all its threads; unlike wall time they barely
    move when other jobs take the cores away.
    """
    for f in sides.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for k, f in sides.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


# ---------------------------------------------------------------- models

def random_koclip(config, seed: int = 0):
    """A KoCLIP of `config` filled with N(0, 0.02) weights, He-scaled conv kernels,
    LayerNorm/BatchNorm scales 1 and biases 0."""
    from flax import nnx

    from koclip.formats.convert import assign, param_shapes
    from koclip.model import KoCLIP

    model = nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def items():
        for name, (shape, dtype) in param_shapes(model).items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("scale", "var"):
                x = np.ones(shape, dtype)
            elif leaf in ("bias", "mean"):
                x = np.zeros(shape, dtype)
            elif name == "logit_scale":
                x = np.full(shape, config.logit_scale_init, dtype)
            elif len(shape) == 4:  # conv kernels (kh, kw, in, out): He scale keeps a CNN's activations alive
                x = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2 / np.prod(shape[:3]))).astype(dtype)
            else:
                x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
            yield name, x

    assign(model, items(), "random")
    return model


class TorchEncoder:
    """A transformers tower + a projection + L2 normalisation, in fp32 or bf16."""

    def __init__(self, tower, pool, n_in: int, n_out: int, dtype):
        import torch

        self.tower = tower.eval().to(dtype)
        self.proj = torch.nn.Linear(n_in, n_out, bias=False).eval().to(dtype)
        self.pool = pool
        self.dtype = dtype

    def __call__(self, **inputs):
        import torch

        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            z = self.proj(self.pool(self.tower, inputs))
            return torch.nn.functional.normalize(z.float(), dim=-1)


def _pooler_output(tower, inputs):
    return tower(**inputs).pooler_output


def _mean_pool(tower, inputs):
    hidden = tower(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _efficientnet_pool(tower, inputs):
    return tower.extract_features(inputs["pixel_values"]).mean(dim=(2, 3))


def torch_towers(arch: str, config):
    """(image encoder factory, text encoder factory), each `factory(dtype) -> TorchEncoder`."""
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

    t, v, p = config.text, config.vision, config.projection_dim
    if v.kind == "clip":
        vcfg = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act)

        def image(dtype):
            return TorchEncoder(CLIPVisionModel(vcfg), _pooler_output, v.hidden_size, p, dtype)
    elif v.kind == "efficientnet":
        from efficientnet_lite_pytorch import EfficientNet

        def image(dtype):
            return TorchEncoder(EfficientNet.from_name(f"efficientnet-{v.variant}"), _efficientnet_pool,
                                v.output_dim, p, dtype)
    else:
        raise ValueError(f"{arch}: no PyTorch counterpart for vision kind {v.kind!r}")
    cls, tcls = (RobertaConfig, RobertaModel) if t.kind == "roberta" else (BertConfig, BertModel)
    tcfg = cls(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
               num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
               max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
               layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id, hidden_act=t.hidden_act)
    pool = _pooler_output if t.pooling == "pooler" else _mean_pool

    def text(dtype):
        return TorchEncoder(tcls(tcfg, add_pooling_layer=t.pooling == "pooler"), pool, t.hidden_size, p, dtype)

    return image, text


# ---------------------------------------------------------------- one architecture

def inputs(config, batch: int, text_len: int, seed: int = 0):
    """Random pixels (batch, S, S, 3) and token ids/mask (batch, text_len) within the vocabulary."""
    rng = np.random.default_rng(seed)
    s = config.vision.image_size
    pixels = rng.standard_normal((batch, s, s, 3), dtype=np.float32)
    ids = rng.integers(5, min(config.text.vocab_size, 30000), (batch, text_len)).astype(np.int32)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    return pixels, ids, mask


def measure(arch: str, model, args) -> list[dict]:
    """Rows of the result table for one architecture; `model` is its fp32 KoCLIP."""
    import torch

    from koclip.quantize import quantize

    config = model.config
    jax_models = {m: (model if m == "fp32" else quantize(model, m)) for m in args.modes}
    image_factory, text_factory = torch_towers(arch, config)
    rows = []
    for kind, factory in (("image", image_factory), ("text", text_factory)):
        torch_models = {f"torch {n}": factory(d) for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        for label, batch, rounds in ((f"{kind} throughput", args.batch, args.rounds),
                                     (f"{kind} latency", 1, args.latency_rounds)):
            pixels, ids, mask = inputs(config, batch, args.text_len)
            sides, outputs = {}, {}
            for name, m in jax_models.items():
                if kind == "image":
                    call = (lambda m: lambda: np.asarray(m.encode_image(pixels)))(m)
                else:
                    call = (lambda m: lambda: np.asarray(m.encode_text(ids, mask)))(m)
                sides[f"koclip {name}"] = call
            tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
            ti, tm = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
            for name, enc in torch_models.items():
                if kind == "image":
                    sides[name] = (lambda enc: lambda: enc(pixel_values=tp))(enc)
                else:
                    sides[name] = (lambda enc: lambda: enc(input_ids=ti, attention_mask=tm))(enc)
                # PyTorch's per-op thread hand-offs stall when other jobs hold the cores, so one
                # thread can beat two on a shared machine: race both and compare with the faster.
                sides[f"{name} 1 thread"] = one_thread(sides[name])
            times, cpu = race(sides, rounds)
            for name in jax_models:
                outputs[name] = sides[f"koclip {name}"]()
            agree = {n: float(np.min(np.sum(outputs["fp32"] * o, -1))) for n, o in outputs.items()
                     if "fp32" in outputs and n != "fp32"}
            rows.append(dict(arch=arch, label=label, batch=batch, times=times, cpu=cpu, agree=agree,
                             load=os.getloadavg()[0]))
            print_row(rows[-1], flush=True)
        del torch_models
        gc.collect()
    return rows


def one_thread(f):
    """`f` run with torch.set_num_threads(1), restoring the thread count afterwards."""
    import torch

    def call():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return f()
        finally:
            torch.set_num_threads(n)

    return call


def torch_best(times: dict, dtype: str) -> float:
    """Best time of the PyTorch sides of `dtype` ("fp32"/"bf16"), whatever their thread count."""
    return min(min(ts) for name, ts in times.items() if name.startswith(f"torch {dtype}"))


def print_row(row: dict, flush: bool = False) -> None:
    times, cpu, batch = row["times"], row["cpu"], row["batch"]
    latency = batch == 1
    unit = "ms" if latency else ("img/s" if row["label"].startswith("image") else "texts/s")

    def value(t):
        return 1e3 * t if latency else batch / t

    print(f"\n{row['arch']}: {row['label']} (batch {batch}, {len(next(iter(times.values())))} rounds, "
          f"load {row['load']:.1f})")
    print(f"  {'side':21s} {'best ' + unit:>13s} {'median':>9s} {'cpu-s/call':>11s}   "
          f"{'speed-up vs torch bf16 / fp32':>30s}   {'by cpu-s vs bf16 / fp32':>24s}")
    for name, ts in times.items():
        best, med, c = min(ts), statistics.median(ts), min(cpu[name])
        r16, r32 = torch_best(times, "bf16") / best, torch_best(times, "fp32") / best
        c16, c32 = torch_best(cpu, "bf16") / c, torch_best(cpu, "fp32") / c
        print(f"  {name:21s} {value(best):13.1f} {value(med):9.1f} {c:11.3f}   "
              f"{r16:20.2f}x / {r32:5.2f}x   {c16:14.2f}x / {c32:5.2f}x")
    if row["agree"]:
        print("  min cosine to koclip fp32: " + ", ".join(f"{k} {v:.5f}" for k, v in row["agree"].items()))
    if flush:
        sys.stdout.flush()


def summary(rows: list[dict]) -> None:
    print("\nSummary: speed-up of each koclip precision = time of the faster torch side (2 or 1 threads) / "
          "time of the koclip side (best rounds; >1 means koclip is faster), by wall time and [by CPU seconds]")
    for row in rows:
        t, c = row["times"], row["cpu"]
        parts = []
        for name in (k for k in t if k.startswith("koclip")):
            best, cbest = min(t[name]), min(c[name])
            parts.append(f"{name.split()[1]} {torch_best(t, 'bf16') / best:.2f}x/{torch_best(t, 'fp32') / best:.2f}x "
                         f"[{torch_best(c, 'bf16') / cbest:.2f}x/{torch_best(c, 'fp32') / cbest:.2f}x]")
        print(f"  {row['arch']:14s} {row['label']:16s} vs torch bf16/fp32: " + "  ".join(parts))


def mini_architecture():
    """koclip-mini's architecture (multilingual-e5-small + EfficientNet-Lite0, affine heads)."""
    from koclip.config import ModelConfig, TextConfig, VisionConfig
    from koclip.mini.e5 import E5_CONFIG

    return ModelConfig(text=TextConfig(kind="bert", pooling="mean", **E5_CONFIG),
                       vision=VisionConfig(kind="efficientnet", image_size=224, patch_size=1, variant="lite0"),
                       head="affine", tokenizer="e5")


def mini_model():
    """(label, fp32 model): koclip-mini itself, or its architecture with random weights when it
    does not load yet (speed does not depend on the weights; quality numbers then mean little)."""
    import koclip

    try:
        model, _ = koclip.load("koclip-mini")
        return "koclip-mini", model
    except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"; say why and go on
        print(f"\nkoclip.load('koclip-mini') failed ({type(e).__name__}: {e});\n"
              "measuring koclip-mini's architecture with random weights instead", flush=True)
    return "mini (random)", random_koclip(mini_architecture())


# ---------------------------------------------------------------- start-up time

CHILD = r"""
import json, sys, time
t0 = time.time()
import koclip, numpy as np
from koclip import compile_cache
ckpt, cache, precision = sys.argv[1], sys.argv[2], sys.argv[3]
if cache:
    compile_cache.enable(cache)
t_import = time.time()
model, processor = koclip.load(ckpt, precision=precision)
t_load = time.time()
s = model.config.vision.image_size
np.asarray(model.encode_image(np.zeros((1, s, s, 3), np.float32)))
t_image = time.time()
batch = processor(text=["이것은 고양이 이다"])
np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))
t_text = time.time()
print(json.dumps(dict(t0=t0, imported=t_import, loaded=t_load, image=t_image, text=t_text)))
"""


def write_checkpoint(directory: Path, config) -> Path:
    """A random-weight koclip checkpoint of `config` with a tiny word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import koclip

    model = random_koclip(config)
    koclip.save(model, directory)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "이것은", "고양이", "이다"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>",
         "bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def startup(args) -> None:
    """Fresh processes: import -> load -> first image embedding -> first text embedding."""
    from koclip.config import KOCLIP_BASE

    with tempfile.TemporaryDirectory(prefix="koclip-startup-") as tmp:
        tmp = Path(tmp)
        if args.startup_model == "base":
            print("writing a random koclip-base checkpoint ...", flush=True)
            source = str(write_checkpoint(tmp / "ckpt", KOCLIP_BASE))
        else:
            source = args.startup_model
        cache = tmp / "jax-cache"
        print(f"\nstart-up of {args.startup_model} (precision={args.precision}), seconds since process start; "
              f"{load_note()}")
        print(f"  {'run':22s} {'import':>7s} {'load':>7s} {'1st image':>10s} {'1st text':>9s} {'total':>7s}")
        for label, cache_dir in (("no persistent cache", ""), ("cache, cold (empty)", str(cache)),
                                 ("cache, warm", str(cache)), ("cache, warm again", str(cache))):
            t_spawn = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, source, cache_dir, args.precision],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"  {label}: child failed:\n{out.stderr[-2000:]}")
                return
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {label:22s} {r['imported'] - t_spawn:7.1f} {r['loaded'] - t_spawn:7.1f} "
                  f"{r['image'] - t_spawn:10.1f} {r['text'] - t_spawn:9.1f} {r['text'] - t_spawn:7.1f}",
                  flush=True)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        print(f"  cache: {sum(1 for _ in cache.rglob('*'))} files, {size / 2**20:.1f} MiB; {load_note()}")


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch 8: a smoke run")
    ap.add_argument("--models", default="base,mini", help="comma-separated: base, mini")
    ap.add_argument("--modes", default=",".join(JAX_MODES), help="koclip precisions to race")
    ap.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    ap.add_argument("--rounds", type=int, default=5, help="rounds at the throughput batch")
    ap.add_argument("--latency-rounds", type=int, default=20, help="rounds at batch 1")
    ap.add_argument("--text-len", type=int, default=16, help="tokens per text")
    ap.add_argument("--startup", action="store_true", help="measure process start -> first embedding instead")
    ap.add_argument("--startup-model", default="base",
                    help="'base' (a random koclip-base checkpoint) or a name/dir for koclip.load")
    ap.add_argument("--precision", default="auto", help="precision for --startup")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.latency_rounds, args.batch = 2, 5, 8
    args.modes = tuple(args.modes.split(","))

    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, XLA with its default one worker per core; {load_note()}")
    if args.startup:
        startup(args)
        return
    from koclip.config import KOCLIP_BASE

    rows: list[dict] = []
    for arch in args.models.split(","):
        if arch == "base":
            label, model = "koclip-base", random_koclip(KOCLIP_BASE)
        elif arch == "mini":
            label, model = mini_model()
        else:
            raise SystemExit(f"unknown --models entry {arch!r}; valid: base, mini")
        rows += measure(label, model, args)
        del model
        gc.collect()
    summary(rows)
    print(f"\n{load_note()}")


if __name__ == "__main__":
    main()
