"""A streaming reader for Flax's msgpack checkpoints (`flax_model.msgpack`).

`flax.serialization.msgpack_restore` needs the whole file in memory and then
builds a second copy of every array.  This reader walks the msgpack structure
from the file and reads each array's bytes straight into its own numpy buffer,
so loading costs one copy of the weights.  It understands the subset of
msgpack that Flax writes: maps, arrays, strings, binaries, numbers, nil,
booleans and Flax's ndarray/npscalar extension types (including arrays that
Flax split into chunks).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

import ml_dtypes
import numpy as np

from koclip.errors import CheckpointError

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


_MAX_DEPTH = 100  # nesting of maps and arrays; Flax trees are a dozen levels deep


class _Reader:
    def __init__(self, f: BinaryIO, path: str, size: int):
        self.f = f
        self.path = path
        self.size = size  # bytes in the file: no length read from it may exceed what is left
        self.depth = 0

    def read(self, n: int) -> bytes:
        # Checked first: f.read(n) allocates n bytes before reading, and n can claim 4 GiB.
        if n > self.size - self.f.tell():
            raise CheckpointError(f"{self.path}: the file ends early (truncated msgpack)")
        b = self.f.read(n)
        if len(b) != n:
            raise CheckpointError(f"{self.path}: the file ends early (truncated msgpack)")
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def header(self):
        """Returns (kind, length_or_value) for the next object."""
        t = self.read(1)[0]
        if t <= 0x7F:
            return "int", t
        if t >= 0xE0:
            return "int", t - 0x100
        if 0x80 <= t <= 0x8F:
            return "map", t & 0x0F
        if 0x90 <= t <= 0x9F:
            return "array", t & 0x0F
        if 0xA0 <= t <= 0xBF:
            return "str", t & 0x1F
        simple = {0xC0: ("nil", None), 0xC2: ("bool", False), 0xC3: ("bool", True)}
        if t in simple:
            return simple[t]
        sized = {0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"),
                 0xD9: ("str", ">B"), 0xDA: ("str", ">H"), 0xDB: ("str", ">I"),
                 0xDC: ("array", ">H"), 0xDD: ("array", ">I"), 0xDE: ("map", ">H"), 0xDF: ("map", ">I")}
        if t in sized:
            kind, fmt = sized[t]
            return kind, self.unpack(fmt)
        numbers = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if t in numbers:
            return ("float" if t in (0xCA, 0xCB) else "int"), self.unpack(numbers[t])
        fixext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if t in fixext:
            return "ext", fixext[t]
        if t in (0xC7, 0xC8, 0xC9):
            return "ext", self.unpack({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[t])
        raise CheckpointError(f"{self.path}: byte 0x{t:02x} at offset {self.f.tell() - 1} "
                              "is not valid msgpack")

    def value(self):
        kind, n = self.header()
        if kind in ("int", "float", "nil", "bool"):
            return n
        if kind == "str":
            return self.read(n).decode("utf-8", errors="replace")
        if kind == "bin":
            return self.read(n)
        if kind in ("array", "map"):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise CheckpointError(f"{self.path}: maps and arrays nested over {_MAX_DEPTH} deep at offset "
                                      f"{self.f.tell()}; a Flax checkpoint nests a dozen")
            try:
                if kind == "array":
                    return [self.value() for _ in range(n)]
                return {self.key(): self.value() for _ in range(n)}
            finally:
                self.depth -= 1
        return self.ext(n)

    def key(self) -> str:
        at = self.f.tell()
        k = self.value()
        if isinstance(k, bytes):
            k = k.decode("utf-8", errors="replace")
        # str() of a nested key would repr its strings, doubling their backslashes at each level:
        # exponential time in the nesting of a few hundred bytes.
        if isinstance(k, (dict, list)) or not isinstance(k, (str, int, float, bool, type(None))):
            raise CheckpointError(f"{self.path}: the map key at offset {at} is a {type(k).__name__}; "
                                  "Flax writes string keys")
        return str(k)

    def ext(self, n: int):
        code = self.read(1)[0]
        start = self.f.tell()
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            # Payload: msgpack array [shape, dtype name, raw bytes]; read the bytes in place.
            kind, count = self.header()
            if kind != "array" or count != 3:
                raise CheckpointError(f"{self.path}: malformed ndarray record at offset {start}")
            shape = self.value()
            dtype_name = self.value()
            if isinstance(dtype_name, bytes):
                dtype_name = dtype_name.decode("utf-8", errors="replace")
            kind, size = self.header()
            if kind != "bin":
                raise CheckpointError(f"{self.path}: malformed ndarray record at offset {start}")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise CheckpointError(f"{self.path}: ndarray record at offset {start} has shape {shape!r}, "
                                      "expected a list of non-negative ints")
            dtype = _dtype(dtype_name, self.path)
            count = math.prod(shape)
            if count * dtype.itemsize != size:
                raise CheckpointError(f"{self.path}: array of shape {tuple(shape)} {dtype_name} "
                                      f"holds {size} bytes, expected {count * dtype.itemsize}")
            if size > self.size - self.f.tell():
                raise CheckpointError(f"{self.path}: the file ends early (truncated msgpack)")
            arr = np.empty(count, dtype)
            got = self.f.readinto(memoryview(arr.view(np.uint8)))
            if got != size:
                raise CheckpointError(f"{self.path}: the file ends early (truncated msgpack)")
            if self.f.tell() - start != n:
                raise CheckpointError(f"{self.path}: ndarray record length mismatch at offset {start}")
            arr = arr.reshape(shape)
            return arr if code == _EXT_NDARRAY else arr[()]
        data = self.read(n)
        if code == _EXT_COMPLEX:
            parts = _Reader(io.BytesIO(data), self.path, len(data)).value()
            if not (isinstance(parts, list) and len(parts) == 2
                    and all(isinstance(p, (int, float)) for p in parts)):
                raise CheckpointError(f"{self.path}: complex record at offset {start} holds {parts!r}, "
                                      "expected [real, imag]")
            return complex(*parts)
        raise CheckpointError(f"{self.path}: unknown msgpack extension type {code}")


def _dtype(name, path: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        if not isinstance(name, str):
            raise TypeError
        dtype = np.dtype(name)
    except Exception:  # noqa: BLE001 - np.dtype parses its string with several parsers
        dtype = None
    # Object, structured, sub-array and empty dtypes are nothing Flax writes, and raw bytes
    # cannot be read into the first.
    if dtype is None or dtype.hasobject or dtype.fields or dtype.subdtype or not dtype.itemsize:
        raise CheckpointError(f"{path}: unknown array dtype {name!r}; expected a numeric numpy dtype "
                              "name such as 'float32' or 'bfloat16'") from None
    return dtype


def _unchunk(d: dict, name: str, path: str) -> np.ndarray:
    """A chunked array record {"__msgpack_chunked_array__", "shape": {"0": n, ...}, "chunks": {"0": a, ...}}."""
    try:
        shape = [d["shape"][k] for k in sorted(d["shape"], key=int)]
        chunks = [d["chunks"][k] for k in sorted(d["chunks"], key=int)]
        if not all(type(n) is int and n >= 0 for n in shape) or not all(isinstance(c, np.ndarray) for c in chunks):
            raise ValueError("its shape is not ints or its chunks are not arrays")
        return np.concatenate(chunks).reshape(shape)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: chunked array {name!r} is malformed ({type(e).__name__}: {e}); expected "
                              "integer-keyed maps 'shape' (of ints) and 'chunks' (of arrays) that fit together") from None


def read_tree(path) -> dict:
    """Reads a Flax msgpack file into a nested dict of numpy arrays."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path, os.fstat(f.fileno()).st_size)
            tree = r.value()
            if f.read(1):
                raise CheckpointError(f"{path}: unexpected data after the msgpack object")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a parameter dict, found {type(tree).__name__}")
    return tree


def flatten(tree: dict, prefix: str = "", path: str = "msgpack tree") -> Iterator[tuple[str, np.ndarray]]:
    """Yields ('a.b.c', array) for every leaf, popping leaves so memory is freed as they are consumed.

    path: the file, named in errors.
    """
    for key in list(tree):
        v = tree.pop(key)
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            if "__msgpack_chunked_array__" in v:
                yield name, _unchunk(v, name, path)
            else:
                yield from flatten(v, name + ".", path)
        else:
            try:
                x = np.asarray(v)
            except ValueError as e:  # e.g. a ragged list
                raise CheckpointError(f"{path}: {name!r} holds {type(v).__name__} that is not an array ({e})") from None
            yield name, x
