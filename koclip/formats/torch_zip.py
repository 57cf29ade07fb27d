"""Read PyTorch checkpoints (`pytorch_model.bin`, `.pth`, `.pt`) into numpy arrays, without torch.

`torch.save` writes a pickle whose tensors point at raw storages kept beside it, in one of two
layouts:

* zip (torch >= 1.6): `<name>/data.pkl` is the pickle, `<name>/data/<key>` holds each storage's
  raw bytes and `<name>/byteorder` says "little" or "big" (absent means little).
* legacy (older torch, or `_use_new_zipfile_serialization=False`): five pickles in a row (magic
  number, protocol version, system info, the object, the sorted list of storage keys), then each
  storage in the order of that list as an int64 element count and its little-endian bytes.

`pickle.load` on such a file runs whatever the file names.  Here the unpickler resolves only the
globals of a fixed allow-list, each mapped to an inert object of ours that records what to build;
every other global is refused before anything is imported.  Arrays are made only after the pickle
has been read and its tensors checked against their storages, and only for the state dict.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import sys
import zipfile

import ml_dtypes
import numpy as np

from koclip.errors import CheckpointError

_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy file
_LEGACY_PROTOCOL = 1001  # second pickle of a legacy file
_CHUNK = 1 << 24  # bytes per read: bounds the temporary copy zipfile makes
# Where training scripts commonly put the state dict inside a bigger checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params")

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _FileProblem(Exception):
    """What is wrong with the file; `read_torch_state_dict` adds the path."""


class _Inert:
    """Base of the objects the unpickler hands out: fixed at construction.

    A pickle's BUILD opcode calls `__setstate__` or setattr on whatever object it is given.  Both
    refuse here, so a file cannot alter the shared allow-list entries and poison later loads.
    (A frozen dataclass would not do: with slots it gets a `__setstate__` that writes fields.)
    """

    __slots__ = ()

    def __init__(self, *values):
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise _FileProblem(f"the pickle tries to set {name!r} on {self!r}, which torch never does")

    def __setstate__(self, state):
        raise _FileProblem(f"the pickle tries to set the state of {self!r}, which torch never does")

    def __repr__(self):
        fields = ", ".join(repr(getattr(self, n)) for n in self.__slots__)
        return f"{type(self).__name__.lstrip('_')}({fields})"


class _StorageType(_Inert):
    """Stands for `torch.<Name>Storage`; only used as a tag inside persistent ids."""

    __slots__ = ("name", "dtype")


class _TensorType(_Inert):
    """Stands for `torch.Tensor` / `torch.nn.Parameter` as passed to `_rebuild_from_type_v2`."""

    __slots__ = ("name",)


class _Storage(_Inert):
    """`numel` elements of `dtype` from element `offset` of the file's storage `key`."""

    __slots__ = ("key", "dtype", "offset", "numel")


class _Tensor(_Inert):
    """A strided view (in elements) into a `_Storage`, to be made into an array later."""

    __slots__ = ("storage", "offset", "shape", "strides")


class _Rebuild(_Inert):
    """An allowed torch rebuild function; calling it checks the arguments and records a `_Tensor`."""

    __slots__ = ("name", "func")

    def __call__(self, *args):
        return self.func(*args)


def _is_index(x):
    return type(x) is int and x >= 0


def _rebuild_tensor(storage, offset, shape, strides):
    if not isinstance(storage, _Storage):
        raise _FileProblem(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    shape = tuple(shape) if isinstance(shape, list) else shape
    strides = tuple(strides) if isinstance(strides, list) else strides
    if not (
        _is_index(offset)
        and isinstance(shape, tuple)
        and isinstance(strides, tuple)
        and len(shape) == len(strides)
        and all(map(_is_index, shape + strides))
    ):
        raise _FileProblem(
            f"tensor layout offset={offset!r} size={shape!r} stride={strides!r} is not "
            "a non-negative offset with equally long tuples of non-negative ints"
        )
    return _Tensor(storage, offset, shape, strides)


def _rebuild_tensor_v2(storage, offset, shape, strides, requires_grad, hooks, metadata=None):
    # metadata carries torch's lazy conj/neg bits; honouring them would mean changing values.
    if metadata and (not isinstance(metadata, dict) or any(metadata.values())):
        raise _FileProblem(f"tensor metadata {metadata!r} is not supported (only an empty one is)")
    return _rebuild_tensor(storage, offset, shape, strides)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, _Tensor):
        raise _FileProblem(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data  # requires_grad, hooks and Python attributes mean nothing to an array


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch uses this for tensors that carry Python attributes; the attributes are dropped.
    if not (isinstance(func, _Rebuild) and isinstance(new_type, _TensorType) and type(args) is tuple):
        raise _FileProblem(f"_rebuild_from_type_v2 got {func!r}, {new_type!r}: not a tensor rebuild")
    return func(*args)


_FROM_TYPE_V2 = _Rebuild("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2)
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _Rebuild("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Rebuild("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Rebuild(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    ("torch._tensor", "_rebuild_from_type_v2"): _FROM_TYPE_V2,
    ("torch.tensor", "_rebuild_from_type_v2"): _FROM_TYPE_V2,  # module name before torch 1.10
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.parameter.Parameter"),
    ("collections", "OrderedDict"): collections.OrderedDict,  # C type: BUILD cannot alter it
    **{("torch", n): _StorageType(n, np.dtype(d)) for n, d in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves globals from `_ALLOWED` only, and persistent ids with `resolve(pid) -> _Storage`."""

    def __init__(self, file, resolve=None):
        super().__init__(file)
        self._resolve = resolve

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None and module == "torch" and name.endswith("Storage"):
            raise _FileProblem(
                f"tensors of type torch.{name} are not supported; supported storages: "
                + ", ".join(_STORAGE_DTYPES)
            )
        if found is None:
            raise _FileProblem(
                f"refused to load the global {module}.{name}: only tensors, dicts and plain values "
                "can be read safely (allowed globals: "
                + ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED if not n.endswith("Storage")))
                + " and torch.*Storage). If the file holds a pickled model object, re-save "
                "model.state_dict() with torch.save"
            )
        return found

    def persistent_load(self, pid):
        if self._resolve is None:
            raise _FileProblem("a persistent id appears where torch writes none")
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise _FileProblem(f"persistent id {pid!r} is not a ('storage', ...) tuple")
        return self._resolve(pid[1:])


def _check_memo(file):
    """Refuse a memo index no pickler writes, before the C unpickler sees it.

    That unpickler keeps its memo in an array sized by the largest index put, so one
    LONG_BINPUT of 10**8 in a 200-byte file allocates and clears a gigabyte.  A pickler numbers
    what it memoises 0, 1, 2, ..., so an index is never above the count of opcodes before it.
    Anything else wrong is left for the unpickler to report.
    """
    start = file.tell()
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(file)):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:
                raise _FileProblem(f"the pickle stores memo entry {arg:,} at byte {pos} after only {count} "
                                   "opcodes: not what torch.save writes (corrupt file)")
    except _FileProblem:
        raise
    except Exception:  # noqa: BLE001 - damage: the unpickler below reports it
        pass
    finally:
        file.seek(start)


def _unpickle(file, resolve=None):
    _check_memo(file)
    try:
        return _Unpickler(file, resolve).load()
    except _FileProblem:
        raise
    except Exception as e:  # any failure of the pickle machinery means a damaged file
        raise _FileProblem(f"corrupt or truncated pickle ({type(e).__name__}: {e})") from None


class _StorageTable:
    """The storages a pickle refers to: key -> (dtype, numel), checked for consistency."""

    def __init__(self):
        self.roots = {}

    def root(self, storage_type, key, numel):
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_index(numel)):
            raise _FileProblem(f"storage record ({storage_type!r}, {key!r}, {numel!r}) is malformed")
        known = self.roots.setdefault(key, (storage_type.dtype, numel))
        if known != (storage_type.dtype, numel):
            raise _FileProblem(
                f"storage {key!r} is used both as {known[1]} x {known[0]} "
                f"and as {numel} x {storage_type.dtype}"
            )
        return _Storage(key, storage_type.dtype, 0, numel)

    def resolve_zip(self, data):
        if len(data) != 4:
            raise _FileProblem(f"zip storage record {data!r} does not have 4 fields")
        storage_type, key, _location, numel = data
        return self.root(storage_type, key, numel)

    def resolve_legacy(self, data):
        if len(data) != 5:
            raise _FileProblem(f"legacy storage record {data!r} does not have 5 fields")
        storage_type, key, _location, numel, view = data
        storage = self.root(storage_type, key, numel)
        if view is None:
            return storage
        # Pre-1.0 files could refer to a slice (view_key, offset, size) of a storage, in elements.
        if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
            raise _FileProblem(f"storage view {view!r} is not (key, offset, size)")
        if view[1] + view[2] > numel:
            raise _FileProblem(f"storage view {view!r} runs past the {numel} elements of storage {key!r}")
        return _Storage(storage.key, storage.dtype, view[1], view[2])


def _is_state_dict(obj):
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()
    )


def _describe(obj):
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    items = [f"{k!r}: {type(v).__name__.lstrip('_')}" for k, v in list(obj.items())[:12]]
    return "a dict {" + ", ".join(items) + (", ..." if len(obj) > 12 else "") + "}"


def _find_state_dict(obj):
    """The name -> tensor dict: `obj` itself, or one nested under a usual key or alone in `obj`."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        found = [v for v in obj.values() if _is_state_dict(v)]
        if len(found) == 1:
            return found[0]
    raise _FileProblem(
        f"found no state dict (a dict of name -> tensor) in the checkpoint, which holds {_describe(obj)}; "
        f"expected one at the top or under one of {list(_NESTED_KEYS)}"
    )


def _read_into(src, buf):
    """Fill the uint8 array `buf` from the binary file `src`, in chunks."""
    view, pos = memoryview(buf), 0
    while pos < len(buf):
        n = src.readinto(view[pos : pos + _CHUNK])
        if not n:
            raise _FileProblem(f"storage data ends after {pos} of {len(buf)} bytes (truncated file?)")
        pos += n


def _read_zip(file):
    """(unpickled object, storage table, read(key, nbytes) -> uint8 array, byte order)."""
    try:
        zf = zipfile.ZipFile(file)
        names = zf.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        # NotImplementedError: a zip feature Python cannot read (e.g. "zip file version 25.5")
        raise _FileProblem(f"corrupt or truncated zip archive ({type(e).__name__}: {e})") from None
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _FileProblem(
            f"zip archive has {len(pickles)} '<name>/data.pkl' entries, a torch.save file has 1 "
            f"(entries: {names[:8]})"
        )
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "constants.pkl" in names:
        raise _FileProblem("this is a TorchScript archive (torch.jit.save); save model.state_dict() instead")

    def record(name):
        try:
            with zf.open(name) as f:
                return f.read()
        except Exception as e:  # bad CRC, bad local header, truncated data
            raise _FileProblem(f"cannot read {name!r} from the zip archive ({e})") from None

    byteorder = "little"  # what files written before the byteorder record used
    if prefix + "byteorder" in names:
        byteorder = record(prefix + "byteorder").decode("ascii", "replace")
    if byteorder not in ("little", "big"):
        raise _FileProblem(f"byteorder record says {byteorder!r}, expected 'little' or 'big'")
    table = _StorageTable()
    obj = _unpickle(io.BytesIO(record(pickles[0])), table.resolve_zip)

    def read(key, nbytes):
        name = f"{prefix}data/{key}"
        if name not in names:
            raise _FileProblem(f"storage {key!r} is missing: no {name!r} in the zip archive")
        info = zf.getinfo(name)
        if info.file_size != nbytes:
            raise _FileProblem(f"{name!r} holds {info.file_size} bytes, its tensors need {nbytes}")
        buf = np.empty(nbytes, np.uint8)
        try:
            with zf.open(info) as src:
                _read_into(src, buf)
        except _FileProblem:
            raise
        except Exception as e:
            raise _FileProblem(f"cannot read {name!r} from the zip archive ({e})") from None
        return buf

    return obj, table, read, byteorder


def _read_legacy(file):
    """Like `_read_zip`, for the legacy layout: storages follow the pickles, in key order."""
    magic = _unpickle(file)
    if magic != _MAGIC:
        raise _FileProblem("a pickle that does not start with torch's magic number: not a torch.save file")
    version = _unpickle(file)
    if version != _LEGACY_PROTOCOL:
        raise _FileProblem(f"legacy protocol version {version!r}, only {_LEGACY_PROTOCOL} exists")
    _unpickle(file)  # sys_info: data is little-endian whatever it says
    table = _StorageTable()
    obj = _unpickle(file, table.resolve_legacy)
    keys = _unpickle(file)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _FileProblem(f"the storage key list is a {type(keys).__name__}, expected a list of str")
    if sorted(keys) != sorted(table.roots):
        raise _FileProblem(
            f"stored storages {sorted(keys)[:8]} do not match the used ones {sorted(table.roots)[:8]}"
        )
    # Where each storage's bytes start: after its 8-byte count, one after another.
    starts, pos = {}, file.tell()
    for k in keys:
        dtype, numel = table.roots[k]
        starts[k] = (pos, numel)
        pos += 8 + numel * dtype.itemsize
    size = os.fstat(file.fileno()).st_size
    if pos > size:
        raise _FileProblem(f"file is {size} bytes but its storages need {pos} (truncated file?)")

    def read(key, nbytes):
        start, numel = starts[key]
        file.seek(start)
        count = int.from_bytes(file.read(8), "little", signed=True)
        if count != numel:
            raise _FileProblem(f"storage {key!r} is stored with {count} elements, its record says {numel}")
        buf = np.empty(nbytes, np.uint8)
        _read_into(file, buf)
        return buf

    return obj, table, read, "little"


def _is_c_contiguous(shape, strides):
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _to_array(name, t, raw):
    """The C-contiguous array for `_Tensor` `t` over the uint8 array `raw` of its root storage.

    A view of `raw` when the layout allows, else a copy.
    """
    buf = raw.view(t.storage.dtype)[t.storage.offset : t.storage.offset + t.storage.numel]
    count = math.prod(t.shape)
    if count == 0:
        return np.zeros(t.shape, buf.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.strides))
    if last >= len(buf):
        raise _FileProblem(
            f"tensor {name!r} (size {t.shape}, stride {t.strides}, offset {t.offset}) reaches element "
            f"{last} of a storage with {len(buf)} elements"
        )
    if _is_c_contiguous(t.shape, t.strides):
        return buf[t.offset : t.offset + count].reshape(t.shape)
    try:
        view = np.lib.stride_tricks.as_strided(
            buf[t.offset :], t.shape, [s * buf.itemsize for s in t.strides], writeable=False
        )
        return np.ascontiguousarray(view)
    except (ValueError, OverflowError, MemoryError) as e:  # e.g. a huge broadcast (stride 0) shape
        raise _FileProblem(f"tensor {name!r} of size {t.shape} cannot be built ({e})") from None


def _parse(file):
    """(state dict of `_Tensor`s, storage table, read(key, nbytes), byte order): the pickle read and checked."""
    head = file.read(512)
    file.seek(0)
    if head[:2] == b"PK":
        obj, table, read, byteorder = _read_zip(file)
    elif head[:1] == b"\x80":  # pickle PROTO opcode, which a legacy torch.save file starts with
        obj, table, read, byteorder = _read_legacy(file)
    elif head[257:262] == b"ustar":
        raise _FileProblem("this is a tar-format checkpoint (torch < 0.1.10), which is not supported")
    elif not head:
        raise _FileProblem("the file is empty")
    else:
        hint = " (it looks like safetensors; read it with safetensors)" if head[8:9] == b"{" else ""
        raise _FileProblem(f"not a torch.save file: it starts with {head[:8]!r}{hint}")
    return _find_state_dict(obj), table, read, byteorder


def _arrays(state, table, read, byteorder):
    """Yields (name, array) in file order.  Each storage is read at its first use and dropped after
    its last, so that a consumer that lets each array go holds about one storage at a time."""
    uses = collections.Counter(t.storage.key for t in state.values())
    storages = {}
    for name, t in state.items():
        key = t.storage.key
        if key not in storages:
            dtype, numel = table.roots[key]
            storages[key] = read(key, numel * dtype.itemsize)
            if byteorder != sys.byteorder:
                storages[key].view(dtype).byteswap(inplace=True)
        yield name, _to_array(name, t, storages[key])  # no local name: the consumer decides its lifetime
        uses[key] -= 1
        if not uses[key]:
            del storages[key]


def read_torch_state_dict(path):
    """Read the state dict of a `torch.save` file without torch and without running its code.

    Args:
      path: a `pytorch_model.bin` / `.pth` / `.pt` file, zip or legacy layout.  A state dict
        nested in a dict (under "state_dict", "model", ...) is found and returned; names are kept
        as stored (a DataParallel "module." prefix included).

    Returns:
      {name: array} in file order; each array C-contiguous with the tensor's shape and dtype
      (float32/16/64, ml_dtypes.bfloat16, int64/32/16/8, uint8, bool).  Contiguous tensors are
      views of one buffer per storage, so tensors that shared a storage in torch share memory here.

    Raises:
      CheckpointError: missing, truncated or corrupt file, not a torch checkpoint, no state dict,
        or a pickle that names a global outside the tensor allow-list (e.g. `os.system`).
    """
    return dict(iter_torch_state_dict(path))


def iter_torch_state_dict(path):
    """`read_torch_state_dict` one tensor at a time: an iterator of (name, array) in file order.

    The pickle is read and checked here, so a file that is no checkpoint raises CheckpointError at
    the call.  Each storage is read from the file only when the iterator reaches its first tensor,
    and released after its last, so a caller that lets each array go before asking for the next
    (as loading does) holds one storage at a time instead of the whole checkpoint.  Damaged storage
    data raises CheckpointError during the iteration.  The file stays open until the iterator is
    exhausted or closed.
    """
    try:
        file = open(path, "rb")
    except OSError as e:
        raise _checkpoint_error(path, e) from None
    try:
        parsed = _parse(file)
    except BaseException as e:
        file.close()
        if isinstance(e, (_FileProblem, OSError)):
            raise _checkpoint_error(path, e) from None
        raise
    return _stream(path, file, parsed)


def _stream(path, file, parsed):
    with file:
        try:
            yield from _arrays(*parsed)
        except (_FileProblem, OSError) as e:
            raise _checkpoint_error(path, e) from None


def _checkpoint_error(path, e):
    if isinstance(e, _FileProblem):
        return CheckpointError(f"{os.fspath(path)}: {e}")
    return CheckpointError(f"{os.fspath(path)}: cannot read the checkpoint ({e.strerror or e})")
