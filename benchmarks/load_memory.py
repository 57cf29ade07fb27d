"""Peak memory of loading a koclip-base-sized checkpoint, as a multiple of the checkpoint's size.

Synthesises a full-size random checkpoint (roberta-large + CLIP ViT-B/32, fp32)
in each format, then loads it in a fresh process and reads the peak resident
memory above the process's baseline (jax and koclip imported, nothing loaded).

    python benchmarks/load_memory.py [--formats hybrid-clip,safetensors,koclip] [--dir /tmp/koclip-mem]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for name, x in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


def synthesise(fmt: str, directory: Path) -> Path:
    from flax import nnx

    from koclip.config import KOCLIP_BASE
    from koclip.formats import safetensors_io
    from koclip.formats.convert import param_shapes
    from koclip.model import KoCLIP

    directory.mkdir(parents=True, exist_ok=True)
    shapes = param_shapes(nnx.eval_shape(lambda: KoCLIP(KOCLIP_BASE, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def arrays():
        for name, (shape, _) in shapes.items():
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    cfg = KOCLIP_BASE.to_hf()
    if fmt == "koclip":
        (directory / "config.json").write_text(json.dumps(cfg))
        safetensors_io.write(directory / "model.safetensors", arrays())
        return directory / "model.safetensors"
    hf = {"model_type": "hybrid-clip" if fmt == "hybrid-clip" else "vision-text-dual-encoder",
          "projection_dim": 512, "text_config": {**cfg["text_config"], "model_type": "roberta"},
          "vision_config": cfg["vision_config"]}
    (directory / "config.json").write_text(json.dumps(hf))
    if fmt == "hybrid-clip":
        import flax.serialization

        flat = {}
        for name, x in arrays():
            if name.startswith("vision_model."):
                name = "vision_model." + name
            flat[name] = x
        path = directory / "flax_model.msgpack"
        path.write_bytes(flax.serialization.msgpack_serialize(_nested(flat)))
        return path
    # transformers' PyTorch layout in safetensors: Linear (out, in), conv OIHW, torch leaf names.
    def torch_named():
        for name, x in arrays():
            base, _, leaf = name.rpartition(".")
            if name.startswith("vision_model."):
                base = "vision_model." + base
            if leaf == "kernel":
                x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)
                leaf = "weight"
            elif leaf in ("scale", "embedding"):
                leaf = "weight"
            yield (f"{base}.{leaf}" if base else leaf), np.ascontiguousarray(x)

    path = directory / "model.safetensors"
    safetensors_io.write(path, torch_named())
    return path


def measure(directory: Path) -> dict:
    code = f"""
import time, json, gc
import jax, numpy as np
import koclip
from koclip.loading import load_dual_encoder
gc.collect()
base = int(open('/proc/self/statm').read().split()[1]) * {os.sysconf('SC_PAGE_SIZE')}
t = time.perf_counter()
m = load_dual_encoder({str(directory)!r})
dt = time.perf_counter() - t
peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps(dict(base=base, peak=peak, seconds=dt)))
"""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would inherit the parent's peak.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="hybrid-clip,vision-text-dual-encoder,koclip")
    ap.add_argument("--dir", default="/tmp/koclip-mem")
    args = ap.parse_args()
    print(f"{'format':28s} {'checkpoint':>11s} {'peak-base':>10s} {'ratio':>6s} {'load s':>7s}")
    for fmt in args.formats.split(","):
        d = Path(args.dir) / fmt
        weights = next((d / f for f in ("flax_model.msgpack", "model.safetensors") if (d / f).exists()), None)
        if weights is None:
            weights = synthesise(fmt, d)
        size = weights.stat().st_size
        r = measure(d)
        used = r["peak"] - r["base"]
        print(f"{fmt:28s} {size / 2**30:9.2f}GB {used / 2**30:8.2f}GB {used / size:6.2f} {r['seconds']:7.1f}")


if __name__ == "__main__":
    main()
