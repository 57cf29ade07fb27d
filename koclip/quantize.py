"""Faster CPU inference: a model transformation that swaps matmul layers for low-precision ones.

    fast = quantize(model, mode="bf16")   # or "int8"; towers stay unchanged

Every big `nnx.Linear` is replaced, and so is every convolution that is really
a matmul (ViT patch embeddings, whose stride equals their kernel; 1x1
convolutions).  LayerNorm, softmax, attention, embeddings, BatchNorm and the
other convolutions stay in float32.

Modes:
  "bf16": bfloat16 kernels; inputs rounded to bfloat16 for the product, which
          accumulates in float32.  XLA:CPU hands these dots to YNNPACK, which
          uses the CPU's bf16 dot-product instructions (AVX512-BF16) at about
          twice the float32 rate.
  "int8": int8 kernels with one symmetric scale per output channel; inputs
          quantised on the fly with one symmetric scale per row (per token);
          int8 x int8 -> int32 dot, rescaled to float32:
              y[r, j] ~ sx[r] * sw[j] * sum_k qx[r, k] qw[k, j]
          A quarter of the weight memory, but on the measured CPU (AMD EPYC
          with AVX512-VNNI, jax 0.10) XLA's int8 dot is slower than its bf16
          dot, and the row scales cost extra passes (benchmarks/encode.py).
  "fp32": the model unchanged (a copy).

A quantised model is for inference: its kernels are not trainable, and
checkpoints should be saved from the float32 model.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from koclip import compile_cache
from koclip.errors import KoclipError
from koclip.towers.layers import to_patches

MODES = ("bf16", "int8", "fp32")
# Layers with fewer weights than this stay float32: too small to matter for
# speed, and each rounding step costs a little accuracy.
MIN_WEIGHTS = 1024
_QMAX = 127.0


class LowPrecisionKernel(nnx.Variable):
    """A bfloat16 or int8 (in_features, out_features) weight matrix."""


class QuantScale(nnx.Variable):
    """Per-output-channel float32 scales (out_features,) of an int8 kernel."""


def quantize_weights(kernel) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) float kernel -> (int8 (in, out), float32 scale (out,)), symmetric per column.

    An all-zero column gets scale 1 so dequantising never divides by zero.
    """
    w = np.asarray(kernel, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / _QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -_QMAX, _QMAX).astype(np.int8)
    return q, scale


def quantize_rows(x):
    """(..., k) float activations -> (int8 (..., k), float32 scale (..., 1)), symmetric per row."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0)
    q = jnp.clip(jnp.round(x / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return q, scale


def _last_axis(ndim: int):
    """dot_general dimension numbers contracting x's last axis with the kernel's first."""
    return ((ndim - 1,), (0,)), ((), ())


def _bias(bias):
    return None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))


class Int8Linear(nnx.Module):
    """Inference-only stand-in for `nnx.Linear` with int8 weights and per-row int8 inputs.

    `__call__(x (..., in_features) float)` -> (..., out_features) float32.
    """

    def __init__(self, kernel, bias=None):
        kernel = np.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}")
        q, scale = quantize_weights(kernel)
        self.in_features, self.out_features = kernel.shape
        self.kernel = LowPrecisionKernel(jnp.asarray(q))
        self.scale = QuantScale(jnp.asarray(scale))
        self.bias = _bias(bias)

    def __call__(self, x):
        qx, sx = quantize_rows(x.astype(jnp.float32))
        acc = jax.lax.dot_general(qx, self.kernel[...], _last_axis(qx.ndim), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * (sx * self.scale[...])
        return y if self.bias is None else y + self.bias[...]


class Bf16Linear(nnx.Module):
    """Inference-only stand-in for `nnx.Linear` that multiplies in bfloat16, accumulating in float32.

    `__call__(x (..., in_features) float)` -> (..., out_features) float32.
    """

    def __init__(self, kernel, bias=None):
        # Rounded on the host (to nearest even, as jax rounds).  Converted by jax, the new kernels were
        # allocated on jax's threads, where glibc did not reuse the float32 kernels an in-place quantize
        # frees: loading siglip2-base with precision="bf16" peaked at 1.31x its checkpoint, not 1.09x.
        kernel = jnp.asarray(np.asarray(kernel).astype(ml_dtypes.bfloat16))
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}")
        self.in_features, self.out_features = kernel.shape
        self.kernel = LowPrecisionKernel(kernel)
        self.bias = _bias(bias)

    def __call__(self, x):
        y = jax.lax.dot_general(x.astype(jnp.bfloat16), self.kernel[...], _last_axis(x.ndim),
                                preferred_element_type=jnp.float32)
        return y if self.bias is None else y + self.bias[...]


_LINEARS = {"int8": Int8Linear, "bf16": Bf16Linear}


class PatchDense(nnx.Module):
    """A convolution whose stride equals its kernel size, run as reshape + matmul.

    `proj` maps a flattened (kh * kw * c_in) patch to c_out.
    `__call__(x (n, h, w, c_in))` -> (n, h // kh, w // kw, c_out), as the VALID convolution.
    """

    def __init__(self, patch: tuple[int, int], proj: nnx.Module):
        self.patch = tuple(patch)
        self.proj = proj

    def __call__(self, x):
        return self.proj(to_patches(x, self.patch))


def _is_patch_conv(conv: nnx.Conv) -> bool:
    k = tuple(conv.kernel_size)
    s = conv.strides if isinstance(conv.strides, (tuple, list)) else (conv.strides,) * len(k)
    padding_free = conv.padding == "VALID" or all(d == 1 for d in k)
    return (len(k) == 2 and tuple(s) == k and padding_free and conv.feature_group_count == 1
            and conv.input_dilation in (1, (1, 1)) and conv.kernel_dilation in (1, (1, 1)) and conv.mask is None)


def _replacement(module, mode: str, min_weights: int):
    """The low-precision stand-in for `module`, or None to keep it."""
    if isinstance(module, nnx.Linear):
        if module.in_features * module.out_features < min_weights:
            return None
        bias = None if module.bias is None else module.bias[...]
        return _LINEARS[mode](module.kernel[...], bias)
    if isinstance(module, nnx.Conv) and _is_patch_conv(module):
        kernel = module.kernel[...]
        kh, kw, cin, cout = kernel.shape
        if kh * kw * cin * cout < min_weights:
            return None
        bias = None if module.bias is None else module.bias[...]
        return PatchDense((kh, kw), _LINEARS[mode](kernel.reshape(kh * kw * cin, cout), bias))
    return None


def _get_child(root, path):
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set_child(root, path, child):
    parent = _get_child(root, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def quantize(model: nnx.Module, mode: str = "bf16", *, exclude: str | None = None,
             min_weights: int = MIN_WEIGHTS, copy: bool = True) -> nnx.Module:
    """A copy of `model` whose matmul layers run in `mode` ("bf16", "int8", or "fp32" = unchanged).

    Replaced: every `nnx.Linear`, and every `nnx.Conv` whose stride equals its
    kernel (patch embeddings, 1x1 convolutions), with at least `min_weights`
    weights and whose '/'-joined path (e.g. "vision_model/encoder/layers/0/mlp/fc1")
    does not match the regex `exclude`.  The copy shares all unchanged arrays
    with `model`, so it costs only the new kernels; drop `model` to free the
    float32 ones.  `copy=False` swaps the layers of `model` itself instead, so
    each float32 kernel can be freed as soon as it is replaced (lower peak
    memory when loading).  For inference: the new kernels are not trainable.
    """
    if mode not in MODES:
        raise KoclipError(f"unknown quantisation mode {mode!r}; valid: {', '.join(MODES)}")
    out = model
    if copy:
        graphdef, state = nnx.split(model)
        out = nnx.merge(graphdef, state)
        # Plain attributes set with object.__setattr__ (provenance) are not part of the graph.
        if "load_info" in vars(model):
            object.__setattr__(out, "load_info", model.load_info)
    if mode == "fp32":
        return out
    skip = re.compile(exclude) if exclude else None
    paths = [path for path, _ in nnx.iter_modules(out) if not (skip and skip.search("/".join(map(str, path))))]
    # One layer at a time, each replacement made and set before the next: built all first, the new
    # kernels would all sit beside the float32 ones that copy=False is meant to free as it goes.
    for path in paths:
        new = _replacement(_get_child(out, path), mode, min_weights)
        if new is not None:
            _set_child(out, path, jax.block_until_ready(new))
    if not copy:
        compile_cache.forget(out)
    return out


def precision_of(model: nnx.Module) -> str:
    """"int8", "bf16" or "fp32": the mode most of `model`'s replaced layers run in."""
    kinds = [type(m) for _, m in nnx.iter_modules(model)]
    n8, n16 = kinds.count(Int8Linear), kinds.count(Bf16Linear)
    if not n8 and not n16:
        return "fp32"
    return "int8" if n8 >= n16 else "bf16"


def count_replaced(model: nnx.Module) -> int:
    """How many low-precision matmul layers (Int8Linear, Bf16Linear) `model` holds."""
    return sum(isinstance(m, (Int8Linear, Bf16Linear)) for _, m in nnx.iter_modules(model))


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_mode(backend: str | None = None, flags: frozenset[str] | None = None) -> str:
    """The mode `precision="auto"` uses for transformer towers: "bf16" on a CPU with
    bfloat16 dot-product instructions (AVX512-BF16 or AMX), else "fp32".

    Why not int8: on the measured CPU (AMD EPYC, AVX512-BF16 + VNNI, jax 0.10) XLA's
    int8 dot ran at ~150 GOP per CPU-second against ~185 for bf16 and ~95 for fp32,
    and on koclip-mini int8 missed the quality gates (image cosine 0.960, text 0.989)
    where bf16 text kept 0.99997.  Other backends keep fp32: unmeasured.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "fp32"
    flags = cpu_flags() if flags is None else flags
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


# Towers that `precision="auto"` keeps in float32, by vision tower kind, as a regex over
# layer paths.  EfficientNet: koclip-mini's ConSE head picks the CNN's top classes, so
# the small bf16 error of the 1x1 convolutions (pooled-feature cosine 0.9996) can swap a
# class and moved one gallery photo's embedding to cosine 0.9927 < 0.995; float32 there
# costs ~20% of the image tower's speed, not 2x.
AUTO_KEEP_FP32 = {"efficientnet": r"^(vision_model|visual_projection)(/|$)"}


def auto_plan(config, backend: str | None = None, flags: frozenset[str] | None = None) -> tuple[str, str | None]:
    """(mode, exclude) that `precision="auto"` passes to `quantize` for a model of `config`."""
    return auto_mode(backend, flags), AUTO_KEEP_FP32.get(config.vision.kind)
