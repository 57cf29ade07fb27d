"""Inputs that scripts/fuzz.py found to break a parser, each committed under tests/fixtures/fuzz/.

Every input must end in a KoclipError subclass whose message names the file (or the URL), never
another exception type and never memory beyond the fuzzer's cap.  Each test names what the
input raised before its fix.  Inputs whose harm was memory run under `address_space_cap`, the
way the fuzzer runs them.
"""

import contextlib
import dataclasses
import re
import shutil
import socket
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from koclip import images
from koclip.errors import CheckpointError, FetchError, IndexFileError
from koclip.fetch import fetch_url
from koclip.formats import checkpoints
from koclip.formats.checkpoints import read_tensors
from koclip.images import CLIP, open_image, preprocess
from koclip.index import load_index
from koclip.index.journal import _Journal

FUZZ = Path(__file__).parent / "fixtures" / "fuzz"


@contextlib.contextmanager
def address_space_cap(extra_mib=512):
    """Lower this process's address-space limit to what it uses now plus `extra_mib` for the block
    (the soft limit only, so it can be raised back): an allocation beyond it raises MemoryError,
    where without a cap a large untouched allocation would quietly succeed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("address-space caps are checked on Linux")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + (extra_mib << 20), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fixture_copy(tmp_path, target, name) -> Path:
    """A copy of a committed input, so that a reader that deletes or rewrites files cannot harm it."""
    src = FUZZ / target / name
    dest = tmp_path / name
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy(src, dest)
    return dest


# ---------------------------------------------------------------- index, format 1 (meta.json, items, vectors)

def test_index_vectors_header_that_tokenize_rejects_is_an_index_error(tmp_path):
    # Was tokenize.TokenError from numpy's header parser: "'shape': \xff\xff, 4)" never closes.
    path = fixture_copy(tmp_path, "index", "npy-header-tokenize.kidx")
    with pytest.raises(IndexFileError, match=r"vectors file .*vectors\.00\.npy has a corrupt header"):
        load_index(path)


def test_index_vectors_header_claiming_4_gib_is_refused_before_reading(tmp_path):
    # Was MemoryError: a header length of 0xffffffff, which numpy reads before checking it.
    path = fixture_copy(tmp_path, "index", "npy-header-4gib.kidx")
    with address_space_cap(), pytest.raises(IndexFileError, match=r"vectors file .*vectors\.00\.npy"):
        load_index(path)


# ---------------------------------------------------------------- index, format 2 (meta.json, Parquet files)

def read_index(path):
    """What the fuzzer does with an index: load it, search it, read every column."""
    index = load_index(path)
    index.search(np.ones(index.dim, np.float32), k=3, backend="exact")
    return index.sizes, index.sha256, index.widths, index.heights


def damaged(name, was, file, message):
    """A committed index FUZZ/index/name, what reading it raised before its fix (`was`), the data file
    its IndexFileError names and the regex the rest of the message matches."""
    return pytest.param(name, was, file, message, id=name)


@pytest.mark.parametrize("name, was, file, message", [
    # pyarrow does not check that strings are UTF-8 as it reads them; to_pylist decoded them.
    damaged("deletion-segment-not-utf8.kidx", "UnicodeDecodeError", "deleted.00.parquet",
            r"cannot be read \(Column 0: In chunk 0: Invalid: Invalid UTF8 sequence"),
    damaged("deletion-column-name-not-utf8.kidx", "UnicodeDecodeError", "deleted.00.parquet",
            r"cannot be read \('utf-8' codec can't decode"),
    # A damaged page held fewer values than the row group's rows, and pyarrow read what there was:
    # paths were one short of the rows (ArrowIndexError in a search), sha256 a filter's length
    # (ArrowInvalid), vectors fewer than the count (AssertionError in loading).
    damaged("segment-path-column-empty.kidx", "ArrowIndexError", "segment.00.parquet",
            r"is corrupt: its column 'path' holds 0 values for its 3 rows"),
    damaged("segment-sha256-column-empty.kidx", "ArrowInvalid", "segment.00.parquet",
            r"is corrupt: its column 'sha256' holds 0 values for its 4 rows"),
    damaged("segment-vector-column-empty.kidx", "AssertionError", "segment.00.parquet",
            r"is corrupt: a column of row group 0 holds 0 values for its 3 rows"),
    # Found by review, not by the fuzzer: the footer's row count (4) over its row groups' (3).
    damaged("segment-footer-rows-over-row-groups.kidx", "AssertionError", "segment.00.parquet",
            r"is corrupt: its footer says 4 rows but its row groups hold \[3\]"),
])
def test_damaged_format_2_file_is_an_index_error_naming_it(tmp_path, name, was, file, message):
    path = fixture_copy(tmp_path, "index", name)
    with pytest.raises(IndexFileError, match=re.escape(str(path / file)) + " " + message):
        read_index(path)


# ---------------------------------------------------------------- a build's journal (chunk .npz)

JOB = {"model": "m", "fingerprint": "f" * 64, "images_root": "/nonexistent", "shard": None}


@pytest.mark.parametrize("name", ["zip-version-8.npz", "zip-patched-data.npz"])
def test_journal_chunk_in_a_zip_variant_python_cannot_read_is_dropped(tmp_path, name, caplog):
    # Were NotImplementedError from zipfile ("zip file version 8.0", "compressed patched data").
    journal = _Journal(tmp_path / "out.kidx.partial", JOB)
    chunk = journal.dir / "chunk-000001.npz"
    shutil.copy(FUZZ / "journal" / name, chunk)
    assert journal.read()["chunks"] == []  # dropped: its images are embedded again
    assert not chunk.exists() and "is unreadable (NotImplementedError" in caplog.text


def test_journal_vectors_of_a_chunk_python_cannot_unzip_are_an_index_error(tmp_path):
    chunk = fixture_copy(tmp_path, "journal", "zip-version-8.npz")
    with pytest.raises(IndexFileError, match=rf"journal chunk {chunk} became unreadable \(NotImplementedError"):
        _Journal.vectors(chunk)


# ---------------------------------------------------------------- fetch (an HTTP response from 127.0.0.1)

@contextlib.contextmanager
def serving(response: bytes):
    """A server on 127.0.0.1 answering each connection with `response` as raw bytes; yields its URL."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(response)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/image.png"
    finally:
        server.close()


def fetch_fixture(name):
    with serving((FUZZ / "fetch" / name).read_bytes()) as url:
        return url, fetch_url(url, allow_private=True, timeout=5, max_redirects=2)


def test_fetch_content_length_with_a_non_ascii_digit_is_ignored():
    # Was ValueError from int(): "Content-Length: 999\xb99999" passes str.isdigit ("¹" is a digit).
    # Such a length is no length: the body is read to the end of the connection (here: none).
    _, body = fetch_fixture("content-length-superscript.http")
    assert body == b""


def test_fetch_redirect_to_an_unclosed_ipv6_host_is_a_fetch_error():
    # Was ValueError("Invalid IPv6 URL") from urljoin, outside every handler.
    with pytest.raises(FetchError, match=r"cannot fetch http://127\.0\.0\.1:\d+/image\.png: it redirects to "
                                         r"'http://e.*', which is not a valid URL \(Invalid IPv6 URL\)"):
        fetch_fixture("location-unclosed-ipv6.http")


def test_fetch_refused_redirect_target_names_the_url_that_redirected():
    # Was "refused 'cation: /next?x=1': URLs may not contain spaces ...", naming no URL fetched.
    with pytest.raises(FetchError, match=r"refused 'cation: /next\?x=1': URLs may not contain spaces .* "
                                         r"\(where http://127\.0\.0\.1:\d+/image\.png redirected\)"):
        fetch_fixture("location-with-space.http")


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("name", ["tall-8x655360.tif", "tall-8x655360-slow.tif"])
def test_preprocess_of_a_long_thin_image_makes_only_its_centre_crop(name):
    # Was MemoryError (or over 5 s): 8 x 655,360 pixels, under max_pixels, resized its short side
    # to 224 and so its long side to 18 million pixels before cropping 224 of them.
    im = open_image(FUZZ / "image" / name)
    with address_space_cap():
        batch = preprocess([im, im], "clip")
    assert batch.shape == (2, 224, 224, 3) and np.isfinite(batch).all()


def test_float_tiff_of_38_megapixels_converts_in_blocks():
    # Was over 5 s (28 s on a loaded machine) and ~1.2 GB: 328 bytes declaring a float TIFF of
    # 8 x 4,718,598 pixels (under max_pixels), converted to grey levels through whole-image
    # float64 copies.  Blocks of a million pixels give the same levels.  Address space grows by
    # 576 MB now (Pillow's tobytes holds two 151 MB copies of the pixels, the RGB image 151 MB),
    # by 1,043 MB before.
    with address_space_cap(768):
        im = open_image(FUZZ / "image" / "float-8x4718598.tif")
    assert im.size == (8, 4718598) and im.mode == "RGB"


def test_long_thin_image_crop_only_resampling_matches_resize_then_crop():
    # On a thin image the crop-only path gives the very pixels of resize-then-crop (Pillow 13);
    # on ordinary shapes box resampling can differ by a few levels, so those keep the full resize.
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.repeat(rng.integers(0, 256, (2000, 1, 3), dtype=np.uint8), 3, axis=1))  # 3 x 2000
    spec = dataclasses.replace(CLIP, size=8)
    full = images._preprocess_one(im, spec)
    with mock.patch.object(images, "_MAX_RESIZED_PIXELS", 0):
        cropped = images._preprocess_one(im, spec)
    np.testing.assert_array_equal(cropped, full)


# ---------------------------------------------------------------- checkpoints

def read_all(path):
    """What loading does with a weights file: every (name, array) it holds."""
    items, _ = read_tensors(path)
    return list(items)


def weights(target, name, was, message, *, capped=False):
    """A committed weights file FUZZ/target/name, what it raised before its fix (`was`), the regex
    its CheckpointError matches after "<path>: ", and `capped` where its harm was memory (or time
    spent allocating), so that it is read under address_space_cap as the fuzzer read it."""
    return pytest.param(target, name, was, message, capped, id=f"{target}/{name}")


@pytest.mark.parametrize("target, name, was, message, capped", [
    weights("msgpack", "chunked-without-chunks.msgpack", "KeyError",
            r"chunked array 'params\.w' is malformed \(KeyError: 'chunks'\)"),
    weights("msgpack", "chunk-key-not-int.msgpack", "ValueError",
            r"chunked array 'params\.w' is malformed \(ValueError: invalid literal"),
    weights("msgpack", "chunks-too-short.msgpack", "ValueError",
            r"chunked array 'params\.w' is malformed \(ValueError: cannot reshape"),
    weights("msgpack", "complex-of-a-string.msgpack", "TypeError",
            r"complex record at offset 43 holds \[1\.0+\d*, 'params'\], expected \[real, imag\]"),
    weights("msgpack", "dtype-not-utf8.msgpack", "UnicodeDecodeError", r"malformed ndarray record at offset 15"),
    weights("msgpack", "shape-nested.msgpack", "ValueError",
            r"ndarray record at offset 30 has shape \[2, \[2, 2\]\], expected a list"),
    weights("msgpack", "ragged-list-leaf.msgpack", "ValueError", r"'params\.1' holds list that is not an array"),
    weights("msgpack", "chunk-shape-a-list.msgpack", "IndexError",
            r"chunked array 'params\.w' is malformed \(IndexError"),
    # Found by review, not by the fuzzer: maps nested 5000 deep.
    weights("msgpack", "nested-5000-deep.msgpack", "RecursionError", r"maps and arrays nested over 100 deep"),
    # 236 bytes of maps used as keys of maps, and str() of each key doubling the backslashes of the
    # key inside it: a hang, then MemoryError after ~12 s under the cap.
    weights("msgpack", "map-keys-nested-in-keys.msgpack", "hang",
            r"the map key at offset \d+ is a dict; Flax writes string keys", capped=True),
    # f.read(n) allocated the n bytes a 41-byte file claims before reading them; refused before reading.
    weights("msgpack", "bin-claims-1.6gib.msgpack", "MemoryError", r"the file ends early", capped=True),
    weights("safetensors", "no-data-offsets.safetensors", "KeyError",
            r"tensor 'b' has data_offsets None, expected \[begin, end\]"),
    weights("safetensors", "one-data-offset.safetensors", "ValueError",
            r"tensor 'c' has data_offsets \[15231\], expected \[begin, end\]"),
    weights("safetensors", "no-shape.safetensors", "KeyError", r"tensor 'a\.weight' has shape None, expected a list"),
    weights("safetensors", "dtype-a-list.safetensors", "TypeError",
            r"tensor 'b' has unsupported dtype \[.*\]; valid: F64, F32"),
    # Found by review, not by the fuzzer:
    weights("safetensors", "header-a-list.safetensors", "TypeError",
            r"the safetensors header is a JSON list, expected an object"),
    # np.prod of 2**32 x 2**32 wrapped to 0 bytes:
    weights("safetensors", "shape-product-wraps.safetensors", "ValueError",
            r"tensor 'w' lies outside the file or has the wrong size"),
    weights("torch", "zip-version-25.5.bin", "NotImplementedError",  # from zipfile
            r"corrupt or truncated zip archive \(NotImplementedError: zip file version 25\.5\)"),
    # LONG_BINPUT 67,324,752 made the C unpickler size its memo array to twice that, in a 600-byte
    # legacy file: over 5 s and ~1 GiB.  Refused before unpickling.
    weights("torch", "legacy-memo-index-67m.bin", "MemoryError",
            r"the pickle stores memo entry 67,324,752 at byte 202 after only 11 opcodes", capped=True),
])
def test_malformed_weights_file_is_a_checkpoint_error_naming_the_file(target, name, was, message, capped):
    path = FUZZ / target / name
    with address_space_cap() if capped else contextlib.nullcontext(), \
            pytest.raises(CheckpointError, match=re.escape(str(path)) + ": " + message):
        read_all(path)


def parse_config(directory):
    """What koclip.load (a dual encoder) or from_towers (a tower) makes of a config.json."""
    raw = checkpoints.read_config(directory)
    if raw.get("model_type") in ("hybrid-clip", "vision-text-dual-encoder", "koclip"):
        return checkpoints.dual_encoder_config(directory, raw)
    return checkpoints.tower_config(directory)


@pytest.mark.parametrize("name, was, message", [
    ("json-int", "AttributeError", r"holds a JSON int, expected an object"),
    ("bert-without-vocab-size", "KeyError", r"lacks the key 'vocab_size', which a bert config has"),
    ("roberta-without-intermediate-size", "KeyError", r"lacks the key 'intermediate_size', which a roberta"),
    ("zero-attention-heads", "ZeroDivisionError", r"text_config\.num_attention_heads is 0, expected a positive"),
    ("zero-patch-size", "ZeroDivisionError", r"vision_config\.patch_size is 0, expected a positive integer"),
    # Found by review, not by the fuzzer:
    ("hidden-size-a-string", "TypeError", r"text_config\.hidden_size is '32', expected a positive integer"),
    ("nested-100000-deep", "RecursionError", r"not valid JSON \(nested too deeply\)"),
])
def test_malformed_config_json_is_a_checkpoint_error_naming_the_file(name, was, message):
    directory = FUZZ / "config" / name
    with pytest.raises(CheckpointError, match=re.escape(str(directory / "config.json")) + ": " + message):
        parse_config(directory)
