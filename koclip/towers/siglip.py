"""SigLIP's towers (SigLIP and SigLIP 2's fixed-resolution checkpoints, transformers' `SiglipModel`).

Both are pre-LayerNorm transformers like CLIP's, without CLIP's class token or causal mask, and both
end in a head that puts their output straight into the joint space (so a SigLIP `ModelConfig` has
`text_head = vision_head = "none"`):

- `VisionModel`: patch embedding (a convolution with a bias) + learned position embeddings, the
  encoder, `post_layernorm`, then multihead attention pooling (`head`: one learned query, the probe,
  attends over all patches; LayerNorm and an MLP on a residual).  pooled = the probe's output.
- `TextModel`: token + learned position embeddings, the encoder, `final_layer_norm`; pooled = `head`
  (a Linear) of the LAST position's state, which for a padded text is a padding token's: SigLIP was
  trained on text padded to a fixed length (koclip.Processor's text_padding "max_length").

Parameter names are those of transformers 5.24's modeling_siglip.py (`embeddings.patch_embedding`,
`encoder.layers.0.self_attn.q_proj`, `head.attention.in_proj_weight`, ...), with Flax leaf names
(`kernel`, `scale`, `embedding`), so koclip.formats.convert maps a checkpoint onto them mechanically;
the pooling head's packed q/k/v projection (`in_proj_weight` (3 x hidden, hidden), `in_proj_bias`)
keeps PyTorch's layout and name, as `torch.nn.MultiheadAttention` stores it.  Input pixels are NHWC.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from koclip.config import TextConfig, VisionConfig
# The encoder is CLIP's, parameter names and all: pre-LayerNorm layers, an optional attention mask.
from koclip.towers.clip_vision import MLP, Encoder
from koclip.towers.layers import PatchConv, attention, dense, layer_norm, padding_bias

_INIT = nnx.initializers.normal(0.02)


# ---------------------------------------------------------------- vision


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.patch_embedding = PatchConv(cfg.num_channels, cfg.hidden_size, cfg.patch_size, rngs=rngs)
        # One embedding per patch, no class token; a fixed-resolution checkpoint needs no interpolation.
        self.position_embedding = nnx.Embed(cfg.num_patches, cfg.hidden_size, embedding_init=_INIT, rngs=rngs)

    def __call__(self, pixel_values):
        x = self.patch_embedding(pixel_values)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        positions = self.position_embedding.embedding[...]
        if x.shape[1] != positions.shape[0]:
            raise ValueError(f"SigLIP vision tower: {x.shape[1]} patches, but position embeddings for "
                             f"{positions.shape[0]}; give it images of the config's image_size")
        return x + positions.astype(x.dtype)[None]


class MultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention(hidden, heads, batch_first=True)`'s parameters and arithmetic:
    q/k/v projections packed in one (3 x hidden, hidden) matrix in PyTorch's (out, in) layout."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.in_proj_weight = nnx.Param(_INIT(rngs.params(), (3 * h, h)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * h,)))
        self.out_proj = dense(h, h, rngs)

    def __call__(self, query, keys):
        w, b = self.in_proj_weight[...], self.in_proj_bias[...]
        h = w.shape[1]
        q = query @ w[:h].T.astype(query.dtype) + b[:h].astype(query.dtype)
        k = keys @ w[h:2 * h].T.astype(keys.dtype) + b[h:2 * h].astype(keys.dtype)
        v = keys @ w[2 * h:].T.astype(keys.dtype) + b[2 * h:].astype(keys.dtype)
        return self.out_proj(attention(q, k, v, None, self.num_heads))


class AttentionPoolingHead(nnx.Module):
    """SiglipMultiheadAttentionPoolingHead: a learned probe attends over the patches; LayerNorm and
    MLP on a residual; the probe's output is the image embedding."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.probe = nnx.Param(_INIT(rngs.params(), (1, 1, cfg.hidden_size)))
        self.attention = MultiheadAttention(cfg, rngs)
        self.layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, hidden):
        probe = jnp.broadcast_to(self.probe[...].astype(hidden.dtype), (hidden.shape[0], 1, hidden.shape[-1]))
        x = self.attention(probe, hidden)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class VisionModel(nnx.Module):
    """`__call__(pixel_values (batch, H, W, C))` returns
    (hidden (batch, patches, hidden_size) after post_layernorm, pooled (batch, hidden_size))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.head = AttentionPoolingHead(cfg, rngs)

    def __call__(self, pixel_values):
        hidden = self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
        return hidden, self.head(hidden)


# ---------------------------------------------------------------- text


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_INIT, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_INIT,
                                            rngs=rngs)

    def __call__(self, input_ids):
        n = input_ids.shape[1]
        positions = self.position_embedding.embedding[...]
        if n > positions.shape[0]:
            raise ValueError(f"SigLIP text tower: {n} tokens, more than its {positions.shape[0]} positions")
        tokens = self.token_embedding(input_ids)
        return tokens + positions[:n].astype(tokens.dtype)[None]


class TextModel(nnx.Module):
    """`__call__(input_ids, attention_mask)` with (batch, seq) int arrays returns
    (hidden (batch, seq, hidden_size) after final_layer_norm, pooled (batch, output_dim)).

    As transformers' SiglipTextModel: positions whose mask is 0 are hidden from attention, and the
    pooled state is the last position's whatever the mask says.  SigLIP's own tokenizers return no
    mask (their tokenizer_config.json lists model_input_names ["input_ids"]), so the model sees every
    padding token; koclip.Processor gives such models an all-ones mask (text_mask_padding False).
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.head = dense(cfg.hidden_size, cfg.output_dim, rngs)

    def __call__(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        hidden = self.final_layer_norm(self.encoder(x, padding_bias(attention_mask, x.dtype)))
        return hidden, self.head(hidden[:, -1])


def Model(cfg: TextConfig | VisionConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The SigLIP tower for `cfg`: a TextModel for a TextConfig, else a VisionModel."""
    return TextModel(cfg, rngs=rngs) if isinstance(cfg, TextConfig) else VisionModel(cfg, rngs=rngs)
