"""CLIP's vision transformer (class token, pre-LayerNorm, post-LayerNorm on the class token).

Parameter names follow transformers' Flax CLIP vision transformer
(`embeddings/patch_embedding/kernel`, `pre_layrnorm`, `encoder/layers/0/self_attn/q_proj`, ...).
Input pixels are NHWC.  The encoder layers are CLIP's text transformer's too (koclip.towers.clip_text),
which passes an attention mask.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from koclip.config import TextConfig, VisionConfig
from koclip.towers.layers import PatchConv, activation, attention, dense, layer_norm


class Embeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        h, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (h,)))
        self.patch_embedding = PatchConv(cfg.num_channels, h, p, use_bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, h, rngs=rngs,
                                            embedding_init=nnx.initializers.normal(0.02))

    def __call__(self, pixel_values):
        x = self.patch_embedding(pixel_values)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SelfAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig | TextConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = dense(h, h, rngs)
        self.v_proj = dense(h, h, rngs)
        self.q_proj = dense(h, h, rngs)
        self.out_proj = dense(h, h, rngs)

    def __call__(self, x, bias=None):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), bias, self.num_heads))


class MLP(nnx.Module):
    def __init__(self, cfg: VisionConfig | TextConfig, rngs: nnx.Rngs):
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nnx.Module):
    def __init__(self, cfg: VisionConfig | TextConfig, rngs: nnx.Rngs):
        self.self_attn = SelfAttention(cfg, rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, x, bias=None):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """Pre-LayerNorm layers; `bias`: an additive attention mask broadcastable to (batch, heads, seq, seq),
    or None (every token sees every token)."""

    def __init__(self, cfg: VisionConfig | TextConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, bias=None):
        for layer in self.layers:
            x = layer(x, bias)
        return x


class Model(nnx.Module):
    """`__call__(pixel_values (batch, H, W, C))` returns
    (hidden (batch, 1 + patches, hidden_size), pooled (batch, hidden_size))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)  # sic: the checkpoints' name
        self.encoder = Encoder(cfg, rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden = self.encoder(x)
        return hidden, self.post_layernorm(hidden[:, 0])
