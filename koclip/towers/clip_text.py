"""CLIP's text transformer: token + learned position embeddings, pre-LayerNorm layers under a causal
mask, a final LayerNorm, and the end-of-text token's state as the pooled output.

Parameter names follow transformers' CLIP text model (`embeddings/token_embedding/embedding`,
`encoder/layers/0/self_attn/q_proj`, `final_layer_norm`, ...); the layers are those of the CLIP
vision tower (koclip.towers.clip_vision).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from koclip.config import TextConfig
from koclip.towers.clip_vision import Encoder
from koclip.towers.layers import layer_norm

# Configs from before transformers' PR #24773 say eos_token_id 2; their models pool at the highest id
# (OpenAI's end-of-text token is the last of the vocabulary), as transformers still does for them.
LEGACY_EOS_TOKEN_ID = 2


class Embeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                                            rngs=rngs)

    def __call__(self, input_ids):
        positions = self.position_embedding.embedding[...][: input_ids.shape[1]]
        x = self.token_embedding(input_ids)
        return x + positions.astype(x.dtype)[None]


def causal_padding_bias(attention_mask, dtype=jnp.float32):
    """(batch, seq) 1/0 mask -> additive (batch, 1, seq, seq) bias: query i sees key j when j <= i and
    j is not padding.  One boolean, one minimum: two added minima would overflow to -inf, and a row
    with nothing to see (a left-padded query) would then be NaN instead of uniform."""
    seq = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def eos_positions(input_ids, eos_token_id: int):
    """(batch, seq) ids -> (batch,) index of the token each sequence is pooled at: the first
    `eos_token_id`, or for legacy configs (eos_token_id 2) the first highest id."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class Model(nnx.Module):
    """`__call__(input_ids, attention_mask)` with (batch, seq) int arrays, seq <= max_position_embeddings,
    returns (hidden (batch, seq, hidden_size) after the final LayerNorm, pooled (batch, hidden_size))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        hidden = self.final_layer_norm(self.encoder(x, causal_padding_bias(attention_mask, x.dtype)))
        pooled = jnp.take_along_axis(hidden, eos_positions(input_ids, self.cfg.eos_token_id)[:, None, None], axis=1)
        return hidden, pooled[:, 0]
