"""Reading and writing safetensors files with numpy alone (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then the raw bytes.  Tensors are read
one at a time, so a caller that consumes them in turn holds one at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from koclip.errors import CheckpointError
from koclip.files import atomic_write

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path) -> tuple[dict, int]:
    """Returns (header without __metadata__, offset of the data section)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            n = struct.unpack("<Q", raw)[0]
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is impossible "
                                      f"for a file of {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, "
                              "expected an object of tensor name -> {dtype, shape, data_offsets}")
    header.pop("__metadata__", None)
    end = 8 + n
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: tensor {name!r} is described by {info!r}, "
                                  "expected {dtype, shape, data_offsets}")
        if not isinstance(info.get("dtype"), str) or info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}; "
                                  f"valid: {', '.join(_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_index(d) for d in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, expected a list of "
                                  "non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))):
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, expected "
                                  "[begin, end] in bytes")
        a, b = offsets
        want = math.prod(shape) * _DTYPES[info["dtype"]].itemsize  # exact: np.prod wraps at 2**63
        if b - a != want or end + b > size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size "
                                  "(truncated or corrupt file)")
    return header, end


def _is_index(x) -> bool:
    return type(x) is int and x >= 0


def iter_tensors(path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) in file order, each read into its own buffer."""
    header, start = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, info in items:
            dtype = _DTYPES[info["dtype"]]
            a, b = info["data_offsets"]
            arr = np.empty(math.prod(info["shape"]), dtype)
            f.seek(start + a)
            if f.readinto(memoryview(arr.view(np.uint8))) != b - a:
                raise CheckpointError(f"{path}: the file ends inside tensor {name!r} (truncated)")
            yield name, arr.reshape(info["shape"])


def write(path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    arrays = [(name, np.asarray(x, order="C")) for name, x in tensors]
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, x in arrays:
        if x.dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {x.dtype} in safetensors")
        header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, x in arrays:
            f.write(memoryview(x.reshape(-1).view(np.uint8)))

    atomic_write(path, write)
