"""BERT / RoBERTa text encoder.

Parameter names follow transformers' Flax BERT (`embeddings/word_embeddings/
embedding`, `encoder/layer/0/attention/self/query/kernel`, ...), so PyTorch
and Flax checkpoints map onto it mechanically.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from koclip.config import TextConfig
from koclip.towers.layers import activation, attention, dense, layer_norm, padding_bias


class Embeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                             embedding_init=init, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                               embedding_init=init, rngs=rngs)
        self.LayerNorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, input_ids, position_ids):
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(position_ids)
             + self.token_type_embeddings(jnp.zeros_like(input_ids)))
        return self.LayerNorm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = dense(h, h, rngs)
        self.key = dense(h, h, rngs)
        self.value = dense(h, h, rngs)

    def __call__(self, x, bias):
        return attention(self.query(x), self.key(x), self.value(x), bias, self.num_heads)


class DenseLayerNorm(nnx.Module):
    """dense -> residual -> LayerNorm: BERT's `*Output` blocks."""

    def __init__(self, n_in: int, n_out: int, eps: float, rngs: nnx.Rngs):
        self.dense = dense(n_in, n_out, rngs)
        self.LayerNorm = layer_norm(n_out, eps, rngs)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, rngs)
        self.output = DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, x, bias):
        return self.output(self.self(x, bias), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class Layer(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, bias):
        for layer in self.layer:
            x = layer(x, bias)
        return x


class Pooler(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


def position_ids(input_ids, cfg: TextConfig):
    """RoBERTa counts positions from padding_idx + 1 over non-padding tokens; BERT (and KoCLIP's
    hybrid-clip RoBERTa) from 0: `cfg.positions` says which."""
    if cfg.positions == "padding":
        mask = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(mask, axis=1) * mask + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


class Model(nnx.Module):
    """Text encoder.  `__call__(input_ids, attention_mask)` with (batch, seq) int arrays
    returns (hidden (batch, seq, hidden_size), pooled (batch, hidden_size))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.pooler = Pooler(cfg, rngs) if cfg.pooling == "pooler" else None

    def __call__(self, input_ids, attention_mask):
        x = self.embeddings(input_ids, position_ids(input_ids, self.cfg))
        hidden = self.encoder(x, padding_bias(attention_mask, x.dtype))
        if self.cfg.pooling == "pooler":
            pooled = self.pooler(hidden)
        elif self.cfg.pooling == "mean":
            m = attention_mask[..., None].astype(hidden.dtype)
            pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        else:
            pooled = hidden[:, 0]
        return hidden, pooled
