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
          A quarter of the weight memory; whether it is faster than bf16 depends
          on the CPU (on AMD Zen 4 and Zen 5 XLA's int8 dot is slower than its bf16
          one, on an Intel Xeon with AMX much faster: benchmarks/encode.py), which
          is why `precision="auto"` measures (koclip.autotune).
  "fp32": the model unchanged (a copy).

`simulate(model, mode)` computes what `quantize` would from the float32 kernels,
rounding them inside each call: for checking a mode's quality without the memory
of a second copy.  `koclip.autotune` picks a mode per tower by measurement
(`precision="auto"`).

A quantised model is for inference: its kernels are not trainable, and
checkpoints should be saved from the float32 model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
_INV_QMAX = np.float32(1 / _QMAX)


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
    # Products with float32 reciprocals, not divisions: XLA rewrites a division by a constant or by
    # a broadcast so, and `quantize_columns` (inside a trace) must give the same codes bit for bit.
    scale = np.where(amax > 0, amax * _INV_QMAX, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w * (np.float32(1) / scale)), -_QMAX, _QMAX).astype(np.int8)
    return q, scale


def quantize_rows(x):
    """(..., k) float activations -> (int8 (..., k), float32 scale (..., 1)), symmetric per row."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax * _INV_QMAX, 1.0)
    q = jnp.clip(jnp.round(x * (1.0 / scale)), -_QMAX, _QMAX).astype(jnp.int8)  # as quantize_weights
    return q, scale


def _last_axis(ndim: int):
    """dot_general dimension numbers contracting x's last axis with the kernel's first."""
    return ((ndim - 1,), (0,)), ((), ())


def quantize_columns(w):
    """`quantize_weights` inside a trace: (in, out) float32 -> (int8 codes, float32 scale (out,)),
    the same codes and scales bit for bit (correctly rounded float32 operations, round half to even)."""
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax * _INV_QMAX, 1.0)
    return jnp.clip(jnp.round(w * (1.0 / scale)), -_QMAX, _QMAX).astype(jnp.int8), scale


def int8_matmul(x, q, scale, bias=None):
    """x (..., k) float @ int8 codes q (k, n) with column scales (n,) -> (..., n) float32:
    x quantised per row, an int8 x int8 -> int32 dot, rescaled (Int8Linear's arithmetic)."""
    qx, sx = quantize_rows(x.astype(jnp.float32))
    acc = jax.lax.dot_general(qx, q, _last_axis(qx.ndim), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (sx * scale)
    return y if bias is None else y + bias


def bf16_matmul(x, kernel, bias=None):
    """x (..., k) float @ bfloat16 kernel (k, n) -> (..., n) float32: x rounded to bfloat16,
    products accumulated in float32 (Bf16Linear's arithmetic)."""
    y = jax.lax.dot_general(x.astype(jnp.bfloat16), kernel, _last_axis(x.ndim), preferred_element_type=jnp.float32)
    return y if bias is None else y + bias


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
        return int8_matmul(x, self.kernel[...], self.scale[...], None if self.bias is None else self.bias[...])


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
        return bf16_matmul(x, self.kernel[...], None if self.bias is None else self.bias[...])


_LINEARS = {"int8": Int8Linear, "bf16": Bf16Linear}


class RoundingLinear(nnx.Module):
    """Int8Linear's or Bf16Linear's arithmetic on a float32 kernel that it rounds inside every call.

    The same codes and so the same products as the stand-in `quantize` would build, from the
    float32 kernel itself (shared, not copied): no new weight memory, but each call pays the
    rounding.  `simulate` builds these, to check a precision's quality before spending memory
    on it.  `__call__(x (..., in_features))` -> (..., out_features) float32.
    """

    def __init__(self, kernel, bias=None, *, mode: str):
        if mode not in _LINEARS:
            raise KoclipError(f"unknown rounding mode {mode!r}; valid: {', '.join(_LINEARS)}")
        self.mode = mode
        self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
        self.in_features, self.out_features = self.kernel.shape
        self.bias = _bias(bias)

    def __call__(self, x):
        # Adding 0 * (one input entry) ties the rounding to this layer's input, so XLA rounds each
        # kernel just before its product, not all of them up front (a low-precision copy of them all).
        # (XLA drops optimization barriers on CPU, and does not fold x * 0 for floats.)
        k = self.kernel[...] + 0 * x.reshape(-1)[0].astype(jnp.float32)
        b = None if self.bias is None else self.bias[...]
        if self.mode == "bf16":
            return bf16_matmul(x, k.astype(jnp.bfloat16), b)
        return int8_matmul(x, *quantize_columns(k), b)


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


def _replacement(module, make, min_weights: int):
    """The low-precision stand-in `make(kernel (in, out), bias)` for `module`, or None to keep it."""
    if isinstance(module, nnx.Linear):
        if module.in_features * module.out_features < min_weights:
            return None
        bias = None if module.bias is None else module.bias[...]
        return make(module.kernel[...], bias)
    if isinstance(module, nnx.Conv) and _is_patch_conv(module):
        kernel = module.kernel[...]
        kh, kw, cin, cout = kernel.shape
        if kh * kw * cin * cout < min_weights:
            return None
        bias = None if module.bias is None else module.bias[...]
        return PatchDense((kh, kw), make(kernel.reshape(kh * kw * cin, cout), bias))
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
    out = _swap(model, None if mode == "fp32" else _LINEARS[mode], exclude, min_weights, copy)
    if not copy and mode != "fp32":
        compile_cache.forget(out)
    return out


def simulate(model: nnx.Module, mode: str, *, exclude: str | None = None,
             min_weights: int = MIN_WEIGHTS) -> nnx.Module:
    """A copy of `model` that computes what `quantize(model, mode, exclude=..., min_weights=...)`
    would, from `model`'s own float32 kernels (`RoundingLinear`): the same layers are replaced and
    round the same way, but no low-precision copy of the weights is made, so checking a mode's
    quality costs no memory beyond the float32 model (only speed: each call rounds the kernels)."""
    if mode not in MODES:
        raise KoclipError(f"unknown quantisation mode {mode!r}; valid: {', '.join(MODES)}")
    make = None if mode == "fp32" else (lambda kernel, bias: RoundingLinear(kernel, bias, mode=mode))
    return _swap(model, make, exclude, min_weights, copy=True)


def _swap(model, make, exclude, min_weights, copy):
    out = model
    if copy:
        graphdef, state = nnx.split(model)
        out = nnx.merge(graphdef, state)
        # Plain attributes set with object.__setattr__ (provenance) are not part of the graph.
        if "load_info" in vars(model):
            object.__setattr__(out, "load_info", model.load_info)
    if make is None:
        return out
    if not copy:
        compile_cache.forget(out)  # its split holds the Variables, which would keep float32 kernels alive
    skip = re.compile(exclude) if exclude else None
    paths = [path for path, _ in nnx.iter_modules(out) if not (skip and skip.search("/".join(map(str, path))))]
    # One layer at a time, holding only paths in between: in place, each float32 kernel is
    # unreferenced (and freed) as soon as its stand-in is set, so the peak is one layer over.
    freed = 0
    for path in paths:
        old = _get_child(out, path)
        new = _replacement(old, make, min_weights)
        if new is not None:
            freed += old.kernel.size * old.kernel.dtype.itemsize
            del old
            _set_child(out, path, jax.block_until_ready(new))
            if not copy and freed >= TRIM_BYTES:
                trim_heap()
                freed = 0
    if not copy and freed:
        trim_heap()
    return out


# Quantising in place hands freed memory back to the OS every this many bytes of float32 kernels.
TRIM_BYTES = 64 << 20


def trim_heap() -> None:
    """Returns freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere).

    The float32 kernels were allocated by the thread that loaded them, their low-precision stand-ins
    by XLA's threads, from other malloc arenas that do not reuse the freed blocks: without this, a
    model quantised in place peaks at the float32 model plus all the new kernels.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def precision_of(model: nnx.Module) -> str:
    """"int8", "bf16" or "fp32": the mode most of `model`'s replaced layers run in."""
    kinds = [type(m) for _, m in nnx.iter_modules(model)]
    n8, n16 = kinds.count(Int8Linear), kinds.count(Bf16Linear)
    if not n8 and not n16:
        return "fp32"
    return "int8" if n8 >= n16 else "bf16"


def replaceable_weights(model: nnx.Module, *, exclude: str | None = None, min_weights: int = MIN_WEIGHTS) -> int:
    """How many weights the layers that `quantize(model, ..., exclude=..., min_weights=...)` would
    replace hold: the share of a model that a precision changes."""
    skip = re.compile(exclude) if exclude else None
    total = 0
    for path, module in nnx.iter_modules(model):
        if skip and skip.search("/".join(map(str, path))):
            continue
        if _replacement(module, lambda kernel, bias: kernel, min_weights) is not None:
            kernel = module.kernel
            total += int(np.prod(kernel.shape))
    return total


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
