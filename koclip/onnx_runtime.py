"""ONNX Runtime serving for koclip's towers: an exported path that `precision="auto"` may choose.

    runner = onnx_runtime.session(model, "text", "ort-int8")   # export + an InferenceSession
    z = runner(input_ids, attention_mask)                      # (n, projection_dim), L2-normalised
    onnx_runtime.attach(model, "text", "ort-int8")             # model.encode_text now runs it

`export(model, tower, mode)` writes the ONNX graph of one tower of a KoCLIP (float32, or for
"ort-int8" float32 or quantised to koclip's int8) from its own weights, its projection head, pooling and L2 normalisation included, so its output is what
`model.encode_image` / `model.encode_text` return.  Supported towers: CLIP's vision transformer
and Google's ViT (image), BERT and RoBERTa (text); `exportable(config, tower)` says which.  The
batch axis is dynamic; token sequences come in the processor's length buckets.

Modes:
  "ort-fp32"  float32 throughout: the same arithmetic as koclip's float32 path, summed in another
              order (its own matmul blocking), with ONNX Runtime's fused LayerNorm, GELU and
              attention kernels.
  "ort-int8"  koclip's int8 arithmetic (`koclip.quantize`, mode "int8") in ONNX Runtime: every
              matmul layer that `quantize` would replace (`MIN_WEIGHTS` and up: the transformer's
              dense layers, the patch embedding, large heads) with int8 weights, one symmetric
              scale per output column (the same codes), activations quantised per row (per token)
              with one symmetric scale each (QuantizeLinear), an integer product rescaled by both
              scales inside the matmul (MatMulIntegerToFloat, u8 x s8).  Attention products,
              LayerNorm and softmax stay float32.  A tower's hidden states are one (tokens,
              hidden) matrix throughout, and a layer's query, key and value share one
              quantisation of their input.  (ONNX Runtime's
              own dynamic quantisation, one activation scale per tensor, was 10% faster here but
              moved koclip-mini's text embeddings to cosine 0.945 of float32, against 0.986 per row.)

The graph holds no weights: they are handed to the session as external initializers from host
arrays (float32: the model's own arrays; int8: the codes, a quarter of the size), so there is no
serialised copy; ONNX Runtime copies them in when the session is made and packs each matmul's
weights for its kernels.  `autotune.apply` quantises a tower to koclip's int8 in place before
serving it in ort-int8, and `export` reads those codes as they are (the same ones it would make
from the float32 kernels), so the tower is held as int8 codes twice, not as float32 beside them:
a koclip-base load in ort-int8 peaks at 1.08x its checkpoint (docs/memory.md).
Nothing is written to disk.

Sessions run with one intra-op thread per core available to this process, sequential execution and
every graph optimisation; worker threads spin while a run lasts and stop at its end, so a session on a
shared machine does not burn the cores between calls (`session_options`).

onnxruntime and onnx are optional (`pip install 'koclip[onnx]'`): `available()` says whether they
import.  koclip.autotune times these modes beside fp32, bf16 and int8 where they are available
and picks them only where they are faster and keep the same quality gates.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import jax.numpy as jnp
import numpy as np

from koclip.buckets import BATCH_BUCKETS
from koclip.errors import KoclipError
from koclip.model import KoCLIP
from koclip.quantize import _INV_QMAX, MIN_WEIGHTS, Int8Linear, PatchDense, quantize_weights
from koclip.towers.conse import TextHead

log = logging.getLogger(__name__)

MODES = ("ort-fp32", "ort-int8")
OPSET = 21  # QuantizeLinear's block_size (one scale per row of a matrix); onnxruntime >= 1.20 runs it
IR_VERSION = 10  # what opset 21 needs; onnx 1.23 writes a newer one by default, which onnxruntime 1.20 cannot read
EXPORTABLE = {"image": ("clip", "vit"), "text": ("bert", "roberta")}
TOWERS = ("image", "text")
# Initializers at least this large are handed over as external data (the rest are small constants).
_EXTERNAL_BYTES = 128


def available() -> bool:
    """Whether onnxruntime and onnx import here (`pip install 'koclip[onnx]'`)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def exportable(config, tower: str) -> bool:
    """Whether `tower` ("image" or "text") of a model of `config` can be exported (its head too:
    a linear or affine projection, none, or koclip-mini's ConSE text head)."""
    if tower == "image":
        return config.vision.kind in EXPORTABLE["image"] and config.tower_head("vision") != "conse"
    return config.text.kind in EXPORTABLE["text"]


def _check(model, tower: str, mode: str) -> None:
    if mode not in MODES:
        raise KoclipError(f"unknown ONNX Runtime mode {mode!r}; valid: {', '.join(MODES)}")
    if tower not in TOWERS:
        raise KoclipError(f"unknown tower {tower!r}; valid: {', '.join(TOWERS)}")
    if not exportable(model.config, tower):
        cfg = model.config.vision if tower == "image" else model.config.text
        raise KoclipError(f"cannot export a {cfg.kind} {tower} tower to ONNX; exportable kinds: "
                          f"{', '.join(EXPORTABLE[tower])}")
    if not available():
        raise KoclipError(f"{mode} needs onnxruntime and onnx: pip install 'koclip[onnx]'")


# ---------------------------------------------------------------- building the graph

class _Graph:
    """Nodes, constants and external weights of one graph under construction."""

    def __init__(self, mode: str):
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.mode = mode
        self.nodes: list = []
        self.initializers: list = []
        self.external: dict[str, np.ndarray] = {}  # name -> host array handed to the session
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        """An initializer holding `value` (numpy array or scalar): external when large."""
        a = np.asarray(value)
        name = self.name(hint)
        if a.nbytes >= _EXTERNAL_BYTES:
            t = self.TensorProto()
            t.name = name
            t.data_type = self.helper.np_dtype_to_tensor_dtype(a.dtype)
            t.dims.extend(a.shape)
            t.data_location = self.TensorProto.EXTERNAL
            for key, v in (("location", "koclip-memory"), ("offset", "0"), ("length", str(a.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, v
            self.initializers.append(t)
            self.external[name] = np.asarray(a, order="C")
        else:
            self.initializers.append(self.numpy_helper.from_array(np.asarray(a, order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], domain=domain or None, **attrs))
        return out

    # -- layers

    def linear(self, x: str, kernel, bias=None, *, low_precision: bool = True, rows: str | None = None) -> str:
        """x @ kernel (k, n) + bias: a float32 MatMul, or in "ort-int8", for layers that koclip.quantize
        would replace (`low_precision`, MIN_WEIGHTS and up), koclip's int8 arithmetic
        (`koclip.quantize.int8_matmul`; see `int8_products`) for x (rows, k): x quantised per row,
        the kernel per column (`quantize_weights`), an integer product rescaled by both scales."""
        kernel = np.asarray(kernel, np.float32)
        if self._in_int8(kernel) and low_precision:
            return self.int8_products(x, [(*quantize_weights(kernel), bias)], rows)[0]
        y = self.op("MatMul", x, self.const(kernel, "w"))
        return y if bias is None else self.op("Add", y, self.const(np.asarray(bias, np.float32), "b"))

    def _in_int8(self, kernel) -> bool:
        """Whether a float32 kernel runs as int8 codes here: in ort-int8, where koclip.quantize would
        replace its layer."""
        return self.mode == "ort-int8" and kernel.size >= MIN_WEIGHTS

    def _int8_layer(self, module):
        """(codes (k, n) int8, column scales (n,), bias or None) of an nnx.Linear (or a bias-free
        projection) that runs in int8 here, or of koclip.quantize's Int8Linear (its codes as they
        are: the tower was quantised in place, as `attach` does for "ort-int8"); None for one that
        stays float32."""
        bias = None if module.bias is None else np.asarray(module.bias[...], np.float32)
        if isinstance(module, Int8Linear):
            if self.mode != "ort-int8":
                raise KoclipError(f"{self.mode} needs the float32 weights; this tower holds int8 codes")
            return np.asarray(module.kernel[...]), np.asarray(module.scale[...], np.float32), bias
        kernel = np.asarray(module.kernel[...], np.float32)
        return (*quantize_weights(kernel), bias) if self._in_int8(kernel) else None

    def token_rows(self, x: str) -> str | None:
        """In ort-int8, `zero_points(x)` for a tower's hidden states x (tokens, hidden); else None."""
        return self.zero_points(x) if self.mode == "ort-int8" else None

    def zero_points(self, x: str) -> str:
        """The activation zero points (128 as uint8) of `int8_products`, (rows, 1) for x (rows, k):
        made once for all the layers of a tower that see the same rows (QuantizeLinear takes one
        zero point per scale)."""
        return self.op("Expand", self.zero_point, self.rows_by_one(x))

    def rows_by_one(self, x: str) -> str:
        """The int64 shape [rows, 1] of x (rows, ...)."""
        return self.op("Concat", self.op("Shape", x, end=1), self.const(np.array([1], np.int64)), axis=0)

    @functools.cached_property
    def last_axis(self) -> str:
        """The axes input [-1] of a reduction over rows' last axis: one constant for the whole graph."""
        return self.const(np.array([-1], np.int64), "last_axis")

    @functools.cached_property
    def zero_point(self) -> str:
        """The activation codes' zero point, 128 as uint8: one constant for the whole graph."""
        return self.const(np.uint8(128), "zero_point")

    def int8_products(self, x: str, layers, rows: str | None = None) -> list[str]:
        """x (rows, k) quantised once per row, then one integer product for each (q, scale, bias) of
        `layers` (codes (k, n) int8, column scales (n,), bias (n,) or None) -> [(rows, n) float32].

        Per row: s = max(max|x_row| * float32(1 / 127), float32's smallest normal), codes
        round(x / s) + 128 as uint8 (QuantizeLinear, one pass, zero point 128: ONNX Runtime's u8 x s8
        kernels; its s8 x s8 MatMulInteger was 17x slower here), the (rows, 1) scales as one block
        per row (`block_size` k: half the time of a per-axis scale over axis 0 at 512 rows, and no
        reshape).  |x / s| <= 127 up to a rounding, so no code saturates.  MatMulIntegerToFloat
        rescales the product by the column scales inside the matmul, then by the row scales (a (rows,
        1) activation scale), in one pass: (acc * scale) * s.

        koclip's int8 (`koclip.quantize.quantize_rows`) rounds x * (1 / s): the same code except
        where the two roundings fall on either side of a half, one activation in about a million
        (one step).  Its scale is 1 for an all-zero row where this one is the smallest normal: either
        way the codes are 0 and the product the bias.  The rest is float32 rounding: the rescale in
        another order, two roundings each side."""
        k = layers[0][0].shape[0]
        amax = self.op("ReduceMax", self.op("Abs", x), self.last_axis, keepdims=1)
        s = self.op("Max", self.op("Mul", amax, self.const(_INV_QMAX)), self.const(np.finfo(np.float32).tiny))
        codes = self.op("QuantizeLinear", x, s, rows or self.zero_points(x), axis=1, block_size=k)
        outs = []
        for q, scale, bias in layers:
            y = self.op("MatMulIntegerToFloat", codes, self.const(q, "w8"), s,
                        self.const(np.asarray(scale, np.float32), "scale"), self.zero_point,
                        domain="com.microsoft")
            outs.append(y if bias is None else self.op("Add", y, self.const(np.asarray(bias, np.float32), "b")))
        return outs

    def dense(self, x: str, module, rows: str | None = None) -> str:
        """An nnx.Linear (or a bias-free projection) or an Int8Linear applied to x (see `_int8_layer`)."""
        return self.dense_all(x, [module], rows)[0]

    def dense_all(self, x: str, modules, rows: str | None = None) -> list[str]:
        """`dense(x, m)` for each of `modules` (e.g. the query, key and value projections of one
        input).  When all of them run in int8, x is quantised once for all of them (`int8_products`):
        each output is computed as alone, bit for bit, with fewer operations."""
        layers = [self._int8_layer(m) for m in modules]
        if all(layer is not None for layer in layers):
            return self.int8_products(x, layers, rows)
        return [self.linear(x, m.kernel[...], m.bias[...] if m.bias is not None else None, low_precision=False)
                if layer is None else self.int8_products(x, [layer], rows)[0] for m, layer in zip(modules, layers)]

    def layer_norm(self, x: str, module) -> str:
        n = module.num_features
        scale = np.ones(n, np.float32) if module.scale is None else np.asarray(module.scale[...], np.float32)
        bias = np.zeros(n, np.float32) if module.bias is None else np.asarray(module.bias[...], np.float32)
        return self.op("LayerNormalization", x, self.const(scale, "ln_scale"), self.const(bias, "ln_bias"),
                       axis=-1, epsilon=float(module.epsilon))

    def activation(self, x: str, name: str) -> str:
        if name == "gelu":
            return self.op("Gelu", x, domain="com.microsoft")
        if name in ("gelu_new", "gelu_pytorch_tanh"):
            return self.op("FastGelu", x, domain="com.microsoft")
        if name == "quick_gelu":
            return self.op("QuickGelu", x, domain="com.microsoft", alpha=1.702)
        if name == "relu":
            return self.op("Relu", x)
        raise KoclipError(f"no ONNX export for activation {name!r}; valid: gelu, gelu_new, quick_gelu, relu")

    def self_attention(self, y: str, x: str, modules, bias: str | None, num_heads: int, hidden: int, tokens: str,
                       rows: str | None, first_only: bool = False) -> tuple[str, str, str | None]:
        """Multi-head self-attention of a layer's input y (batch * seq, hidden) through its (query, key,
        value) `modules`, beside the residual stream x (y itself in a post-norm layer) -> (attention
        output, x, the zero points of their rows).

        `first_only`, for the last layer of a tower that pools its first token: only position 0 asks a
        query, keys and values still come from every token, and the rest of the layer runs on those
        rows alone, (batch, hidden).  Each row is what the whole layer gives it (quantisation is per
        row: the same codes); for every other token the query, output and MLP products are left out
        (ten twelfths of a layer's, with an MLP four times the hidden size)."""
        if not first_only:
            return self.attention(*self.dense_all(y, modules, rows), bias, num_heads, hidden, tokens), x, rows
        k, v = self.dense_all(y, modules[1:], rows)
        y0 = self.first_token(y, tokens, hidden)
        first_rows = self.token_rows(y0)
        queries = self.rows_by_one(y0)  # [batch, 1]: one query per sequence
        a = self.attention(self.dense(y0, modules[0], first_rows), k, v, bias, num_heads, hidden, tokens, queries)
        return a, y0 if x == y else self.first_token(x, tokens, hidden), first_rows

    def attention(self, q: str, k: str, v: str, bias: str | None, num_heads: int, hidden: int, tokens: str,
                  queries: str | None = None) -> str:
        """koclip.towers.layers.attention: q (batch * seq_q, hidden), k, v (batch * seq, hidden), `tokens`
        the int64 shape [batch, seq] and `queries` [batch, seq_q] (default `tokens`), an additive bias
        broadcastable to (batch, heads, seq_q, seq) -> (batch * seq_q, hidden)."""
        d = hidden // num_heads
        head_dims = self.const(np.array([num_heads, d], np.int64), "heads")
        heads = self.op("Concat", tokens, head_dims, axis=0)
        q_heads = heads if queries is None else self.op("Concat", queries, head_dims, axis=0)
        qh = self.op("Transpose", self.op("Reshape", q, q_heads), perm=[0, 2, 1, 3])
        kh = self.op("Transpose", self.op("Reshape", k, heads), perm=[0, 2, 3, 1])
        vh = self.op("Transpose", self.op("Reshape", v, heads), perm=[0, 2, 1, 3])
        w = self.op("Div", self.op("MatMul", qh, kh), self.const(np.sqrt(np.float32(d)).astype(np.float32)))
        if bias is not None:
            w = self.op("Add", w, bias)
        a = self.op("MatMul", self.op("Softmax", w, axis=-1), vh)
        return self.op("Reshape", self.op("Transpose", a, perm=[0, 2, 1, 3]),
                       self.const(np.array([-1, hidden], np.int64), "merge"))

    def flatten(self, x: str, width: int) -> str:
        """(..., width) -> (rows, width): a transformer's hidden states are kept as one matrix of tokens,
        so every per-token layer (dense, LayerNorm, GELU, residual) runs on the same 2-D shape."""
        return self.op("Reshape", x, self.const(np.array([-1, width], np.int64), "flat"))

    def unflatten(self, x: str, tokens: str, hidden: int) -> str:
        """`flatten`'s inverse: x (batch * seq, hidden), `tokens` [batch, seq] -> (batch, seq, hidden)."""
        return self.op("Reshape", x, self.op("Concat", tokens, self.const(np.array([hidden], np.int64)), axis=0))

    def first_token(self, x: str, tokens: str, hidden: int) -> str:
        """x (batch * seq, hidden), `tokens` [batch, seq] -> (batch, hidden): position 0."""
        return self.op("Gather", self.unflatten(x, tokens, hidden), self.const(np.array(0, np.int64), "zero"), axis=1)

    def l2_normalize(self, z: str) -> str:
        """koclip.towers.layers.l2_normalize: z / max(||z||, 1e-12)."""
        norm = self.op("ReduceL2", z, self.last_axis, keepdims=1)
        return self.op("Div", z, self.op("Max", norm, self.const(np.array(1e-12, np.float32), "eps")))

    def project_and_normalise(self, pooled: str, head) -> str:
        if isinstance(head, TextHead):  # koclip.towers.conse.text_embed (koclip-mini), all float32 as in koclip
            t = self.op("Sub", self.l2_normalize(pooled), self.const(np.asarray(head.mean[...], np.float32), "mean"))
            blend = np.asarray(head.blend[...], np.float32)
            ridge = self.l2_normalize(self.linear(t, head.kernel[...], low_precision=False))
            z = self.op("Concat", self.op("Mul", self.const(blend), ridge),
                        self.op("Mul", self.const(np.float32(1) - blend), self.l2_normalize(t)), axis=-1)
        else:
            z = pooled if head is None else self.dense(pooled, head)
        return self.l2_normalize(z)

    def model(self, inputs, output: str, out_dim: int, name: str):
        h, T = self.helper, self.TensorProto
        graph = h.make_graph(self.nodes, name, inputs, [h.make_tensor_value_info(output, T.FLOAT, ["batch", out_dim])],
                             self.initializers)
        return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
                            ir_version=IR_VERSION, producer_name="koclip")


def _image_graph(model: KoCLIP, g: _Graph):
    cfg = model.config.vision
    T = g.TensorProto
    s, p, c, hdim = cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.hidden_size
    inputs = [g.helper.make_tensor_value_info("pixel_values", T.FLOAT, ["batch", s, s, c])]
    tower = model.vision_model
    o = s // p
    x = "pixel_values"
    if o * p != s:  # the ragged edge a VALID convolution drops
        x = g.op("Slice", x, g.const(np.array([0, 0], np.int64)), g.const(np.array([o * p, o * p], np.int64)),
                 g.const(np.array([1, 2], np.int64)))
    # koclip.towers.layers.to_patches: (n, o, p, o, p, c) -> (n, o, o, p, p, c) -> (n, o * o, p * p * c)
    x = g.op("Reshape", x, g.const(np.array([-1, o, p, o, p, c], np.int64), "patch_shape"))
    x = g.op("Transpose", x, perm=[0, 1, 3, 2, 4, 5])
    x = g.op("Reshape", x, g.const(np.array([-1, o * o, p * p * c], np.int64), "patch_rows"))
    if cfg.kind == "clip":
        emb = tower.embeddings
        conv, cls = emb.patch_embedding, np.asarray(emb.class_embedding[...], np.float32).reshape(1, 1, hdim)
        pos = np.asarray(emb.position_embedding.embedding[...], np.float32)[None]
    else:
        emb = tower.embeddings
        conv, cls = emb.patch_embeddings.projection, np.asarray(emb.cls_token[...], np.float32)
        pos = np.asarray(emb.position_embeddings[...], np.float32)
    patches = g.flatten(x, p * p * c)
    if isinstance(conv, PatchDense):  # quantised in place: its matmul over the same patch rows
        x = g.dense(patches, conv.proj)
    else:
        kernel = np.asarray(conv.kernel[...], np.float32)
        x = g.linear(patches, kernel.reshape(-1, kernel.shape[-1]), None if conv.bias is None else conv.bias[...])
    x = g.op("Reshape", x, g.const(np.array([-1, o * o, hdim], np.int64), "patch_tokens"))
    # The class token, one per row: broadcast to (n, 1, h) by the batch size of x.
    n = g.op("Slice", g.op("Shape", x), g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)))
    shape = g.op("Concat", n, g.const(np.array([1, hdim], np.int64)), axis=0)
    x = g.op("Concat", g.op("Expand", g.const(cls, "cls"), shape), x, axis=1)
    x = g.flatten(g.op("Add", x, g.const(pos, "pos")), hdim)
    tokens = g.op("Concat", n, g.const(np.array([o * o + 1], np.int64)), axis=0)
    rows = g.token_rows(x)
    if cfg.kind == "clip":
        x = g.layer_norm(x, tower.pre_layrnorm)
        layers = tower.encoder.layers
        for i, layer in enumerate(layers):
            a = layer.self_attn
            y, x, rows = g.self_attention(g.layer_norm(x, layer.layer_norm1), x, (a.q_proj, a.k_proj, a.v_proj), None,
                                          a.num_heads, hdim, tokens, rows, first_only=i == len(layers) - 1)
            x = g.op("Add", x, g.dense(y, a.out_proj, rows))
            y = g.layer_norm(x, layer.layer_norm2)
            y = g.dense(g.activation(g.dense(y, layer.mlp.fc1, rows), cfg.hidden_act), layer.mlp.fc2, rows)
            x = g.op("Add", x, y)
        pooled = g.layer_norm(x, tower.post_layernorm)  # the class token's row: the last layer computed no other
    else:
        layers = tower.encoder.layer
        for i, layer in enumerate(layers):
            a = layer.attention.attention
            y, x, rows = g.self_attention(g.layer_norm(x, layer.layernorm_before), x, (a.query, a.key, a.value), None,
                                          a.num_heads, hdim, tokens, rows, first_only=i == len(layers) - 1)
            x = g.op("Add", x, g.dense(y, layer.attention.output.dense, rows))
            y = g.layer_norm(x, layer.layernorm_after)
            y = g.dense(g.activation(g.dense(y, layer.intermediate.dense, rows), cfg.hidden_act), layer.output.dense,
                        rows)
            x = g.op("Add", x, y)
        # The class token's row (the last layer computed no other), through the final LayerNorm and the pooler.
        pooled = g.op("Tanh", g.dense(g.layer_norm(x, tower.layernorm), tower.pooler.dense))
    z = g.project_and_normalise(pooled, model.visual_projection)
    return g.model(inputs, z, model.config.projection_dim, "koclip_image")


def _text_graph(model: KoCLIP, g: _Graph):
    cfg = model.config.text
    T = g.TensorProto
    inputs = [g.helper.make_tensor_value_info(n, T.INT32, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    tower = model.text_model
    emb = tower.embeddings
    hdim = cfg.hidden_size
    if cfg.positions == "padding":  # koclip.towers.bert.position_ids
        real = g.op("Cast", g.op("Not", g.op("Equal", "input_ids", g.const(np.array(cfg.pad_token_id, np.int32)))),
                    to=T.INT32)
        counted = g.op("CumSum", real, g.const(np.array(1, np.int32)))
        positions = g.op("Add", g.op("Mul", counted, real), g.const(np.array(cfg.pad_token_id, np.int32)))
    else:
        seq = g.op("Squeeze", g.op("Slice", g.op("Shape", "input_ids"), g.const(np.array([1], np.int64)),
                                   g.const(np.array([2], np.int64))))
        positions = g.op("Range", g.const(np.array(0, np.int64)), seq, g.const(np.array(1, np.int64)))
    x = g.op("Gather", g.const(np.asarray(emb.word_embeddings.embedding[...], np.float32), "words"), "input_ids")
    x = g.op("Add", x, g.op("Gather", g.const(np.asarray(emb.position_embeddings.embedding[...], np.float32), "pos"),
                            positions))
    x = g.op("Add", x, g.const(np.asarray(emb.token_type_embeddings.embedding[...], np.float32)[0], "token_type"))
    x = g.layer_norm(g.flatten(x, hdim), emb.LayerNorm)
    tokens = g.op("Shape", "input_ids")
    rows = g.token_rows(x)
    # koclip.towers.layers.padding_bias: 0 where attended, float32's lowest elsewhere; (n, 1, 1, seq)
    keep = g.op("Greater", g.op("Unsqueeze", "attention_mask", g.const(np.array([1, 2], np.int64))),
                g.const(np.array(0, np.int32)))
    bias = g.op("Where", keep, g.const(np.array(0.0, np.float32)), g.const(np.array(np.finfo(np.float32).min)))
    first_pooled = cfg.pooling in ("pooler", "cls")
    for i, layer in enumerate(tower.encoder.layer):
        a = layer.attention.self
        last = first_pooled and i == len(tower.encoder.layer) - 1
        y, x, rows = g.self_attention(x, x, (a.query, a.key, a.value), bias, a.num_heads, hdim, tokens, rows, last)
        out = layer.attention.output
        x = g.layer_norm(g.op("Add", g.dense(y, out.dense, rows), x), out.LayerNorm)
        y = g.activation(g.dense(x, layer.intermediate.dense, rows), cfg.hidden_act)
        x = g.layer_norm(g.op("Add", g.dense(y, layer.output.dense, rows), x), layer.output.LayerNorm)
    if cfg.pooling == "pooler":  # x holds the first token's rows alone (first_pooled)
        pooled = g.op("Tanh", g.dense(x, tower.pooler.dense))
    elif cfg.pooling == "mean":
        m = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=T.FLOAT), g.const(np.array([2], np.int64)))
        total = g.op("ReduceSum", g.op("Mul", g.unflatten(x, tokens, hdim), m), g.const(np.array([1], np.int64)),
                     keepdims=0)
        count = g.op("Max", g.op("ReduceSum", m, g.const(np.array([1], np.int64)), keepdims=0),
                     g.const(np.array(1.0, np.float32)))
        pooled = g.op("Div", total, count)
    else:  # "cls": x holds the first token's rows alone (first_pooled)
        pooled = x
    z = g.project_and_normalise(pooled, model.text_projection)
    return g.model(inputs, z, model.config.projection_dim, "koclip_text")


def export(model: KoCLIP, tower: str, mode: str = "ort-fp32"):
    """(onnx.ModelProto, {name: numpy array}): the graph of `tower` ("image" or "text") of float32
    `model` in `mode`, and the weights it names as external initializers (see `session`).

    Inputs: image `pixel_values` (batch, S, S, 3) float32 (NHWC, as koclip's processor gives them);
    text `input_ids`, `attention_mask` (batch, seq) int32.  Output (batch, projection_dim) float32,
    L2-normalised: what encode_image / encode_text return.
    """
    _check(model, tower, mode)
    g = _Graph(mode)
    proto = _image_graph(model, g) if tower == "image" else _text_graph(model, g)
    return proto, g.external


# ---------------------------------------------------------------- running it

def threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def session_options(n_threads: int | None = None):
    """onnxruntime.SessionOptions as koclip runs its sessions: `n_threads` intra-op threads (default:
    this process's cores), sequential execution, every graph optimisation, no spinning between calls
    (`SESSION_CONFIG`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads or threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    return opts


# Worker threads spin while a run lasts (a run is hundreds of operations, each handed to the pool: a
# sleeping thread woken for every one cost 4 ms of a 30 ms text embedding here) and stop at its end, so
# a session does not keep a shared machine's cores busy between calls.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}


def inference_session(proto, external: dict, n_threads: int | None = None):
    """An onnxruntime.InferenceSession (CPU, `session_options(n_threads)`) of graph `proto` whose external
    initializers are the arrays of `external` (name -> numpy array), as `export` returns them."""
    import onnxruntime as ort

    opts = session_options(n_threads)
    names = list(external)
    # The session copies them in before optimising the graph: these host buffers may go afterwards.
    opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(external[n]) for n in names])
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class OrtTower:
    """One exported tower in an ONNX Runtime session.

    `__call__(pixel_values)` (image) or `__call__(input_ids, attention_mask)` (text) -> (n,
    projection_dim) float32 jax array, L2-normalised; runs at most BATCH_BUCKETS[-1] rows per
    session call (the batch axis is dynamic: no padding rows).
    """

    def __init__(self, proto, external: dict, tower: str, mode: str, n_threads: int | None = None):
        self.tower, self.mode = tower, mode
        self.input_names = [i.name for i in proto.graph.input]
        self.out_dim = proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value
        self.session = inference_session(proto, external, n_threads)

    def __call__(self, *arrays):
        if len(arrays) != len(self.input_names):
            raise TypeError(f"the {self.tower} tower takes {', '.join(self.input_names)}; got {len(arrays)} arrays")
        dtypes = (np.float32,) if self.tower == "image" else (np.int32, np.int32)
        arrays = [np.ascontiguousarray(np.asarray(a), dtype=t) for a, t in zip(arrays, dtypes)]
        n = arrays[0].shape[0]
        if n == 0:
            return jnp.zeros((0, self.out_dim), jnp.float32)
        top = BATCH_BUCKETS[-1]
        outs = [self.session.run(None, {k: a[i:i + top] for k, a in zip(self.input_names, arrays)})[0]
                for i in range(0, n, top)]
        return jnp.asarray(outs[0] if len(outs) == 1 else np.concatenate(outs))


def session(model: KoCLIP, tower: str, mode: str, *, n_threads: int | None = None) -> OrtTower:
    """`tower` of `model` exported in `mode` (see `export`) and loaded in an ONNX Runtime session."""
    _check(model, tower, mode)
    proto, external = export(model, tower, mode)
    return OrtTower(proto, external, tower, mode, n_threads)


def attach(model: KoCLIP, tower: str, mode: str) -> KoCLIP:
    """Makes `model.encode_image` (tower "image") or `model.encode_text` ("text") run `tower` through
    an ONNX Runtime session of `mode`; the JAX path stays (training, image_features /
    text_features).  Returns `model`."""
    model.serve(tower, session(model, tower, mode))
    return model


@functools.lru_cache(maxsize=1)
def version() -> str:
    """onnxruntime's version, or "" when it is not installed."""
    if not available():
        return ""
    import onnxruntime as ort

    return ort.__version__
