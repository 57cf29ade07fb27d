"""Speed of the EfficientNet-Lite0 image tower on this machine's CPU.

Prints: time to load the .pth into a Model, first-call (compile) time,
warm latency at batch 1 (median of runs) and throughput at batch 32.

Run:  .venv/bin/python benchmarks/cnn_tower.py [--runs 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from koclip.towers import efficientnet


@jax.jit
def encode(model, pixels):
    """(n, 224, 224, 3) -> pooled features (n, 1280) and logits (n, 1000)."""
    _, pooled = model(pixels)
    return pooled, model.classify(pooled)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed calls at batch 1")
    ap.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    ap.add_argument("--batch-runs", type=int, default=3, help="timed calls at the big batch")
    args = ap.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    t = time.perf_counter()
    model = efficientnet.load_pretrained()
    print(f"load .pth -> Model:        {time.perf_counter() - t:7.2f} s")

    rng = np.random.default_rng(0)
    one = jnp.asarray(rng.standard_normal((1, 224, 224, 3), dtype=np.float32))
    many = jnp.asarray(rng.standard_normal((args.batch, 224, 224, 3), dtype=np.float32))

    print(f"compile + first call, b=1: {timed(encode, model, one):7.2f} s")
    lat = [timed(encode, model, one) for _ in range(args.runs)]
    print(f"warm latency, b=1:         {1e3 * statistics.median(lat):7.1f} ms "
          f"(median of {args.runs}, min {1e3 * min(lat):.1f} ms)")

    print(f"compile + first call, b={args.batch}: {timed(encode, model, many):6.2f} s")
    best = min(timed(encode, model, many) for _ in range(args.batch_runs))
    print(f"throughput, b={args.batch}:          {args.batch / best:7.1f} img/s "
          f"({1e3 * best:.0f} ms per batch, best of {args.batch_runs})")


if __name__ == "__main__":
    main()
