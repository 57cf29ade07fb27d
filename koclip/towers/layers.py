"""Pieces shared by the transformer towers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


def dense(n_in: int, n_out: int, rngs: nnx.Rngs, *, use_bias: bool = True, dtype=None) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


def layer_norm(n: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(n, epsilon=eps, rngs=rngs)


def attention(q, k, v, bias, num_heads: int):
    """Multi-head scaled dot-product attention.

    q, k, v: (batch, seq, hidden); bias: additive (batch, 1, 1, seq) or None.
    Returns (batch, seq, hidden).
    """
    b, s, h = q.shape
    d = h // num_heads
    q = q.reshape(b, s, num_heads, d)
    k = k.reshape(b, k.shape[1], num_heads, d)
    v = v.reshape(b, v.shape[1], num_heads, d)
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
    if bias is not None:
        w = w + bias
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, h)


def padding_bias(attention_mask, dtype=jnp.float32):
    """(batch, seq) 1/0 mask -> additive (batch, 1, 1, seq) bias."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)
