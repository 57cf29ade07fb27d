"""Google's ViT (class token, pre-norm blocks, final LayerNorm, pooler dense + tanh).

Parameter names follow transformers' Flax ViT (`embeddings/cls_token`,
`encoder/layer/0/attention/attention/query`, `layernorm_before`, `pooler/dense`, ...).
Input pixels are NHWC.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from koclip.config import VisionConfig
from koclip.towers.layers import PatchConv, activation, attention, dense, layer_norm


class PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.projection = PatchConv(cfg.num_channels, cfg.hidden_size, p, rngs=rngs)

    def __call__(self, pixel_values):
        x = self.projection(pixel_values)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Embeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, h)))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, cfg.num_patches + 1, h)))
        self.patch_embeddings = PatchEmbeddings(cfg, rngs)

    def __call__(self, pixel_values):
        x = self.patch_embeddings(pixel_values)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = dense(h, h, rngs)
        self.key = dense(h, h, rngs)
        self.value = dense(h, h, rngs)

    def __call__(self, x):
        return attention(self.query(x), self.key(x), self.value(x), None, self.num_heads)


class DenseOut(nnx.Module):
    def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs):
        self.dense = dense(n_in, n_out, rngs)

    def __call__(self, x):
        return self.dense(x)


class Attention(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs)
        self.output = DenseOut(cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, x):
        return self.output(self.attention(x))


class Layer(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.intermediate = DenseOut(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.output = DenseOut(cfg.intermediate_size, cfg.hidden_size, rngs)
        self.layernorm_before = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.layernorm_after = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class Encoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class Pooler(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class Model(nnx.Module):
    """`__call__(pixel_values (batch, H, W, C))` returns
    (hidden (batch, 1 + patches, hidden_size), pooled (batch, hidden_size))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.pooler = Pooler(cfg, rngs)

    def __call__(self, pixel_values):
        hidden = self.layernorm(self.encoder(self.embeddings(pixel_values)))
        return hidden, self.pooler(hidden)
