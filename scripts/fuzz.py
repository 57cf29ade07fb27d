"""Coverage-guided fuzzing of koclip's parsers of untrusted bytes, with atheris (libFuzzer).

    .venv/bin/python scripts/fuzz.py all --seconds 180          # every target, 180 s each
    .venv/bin/python scripts/fuzz.py torch --seconds 600 --max-mb 2048

Needs atheris (requirements-bench.txt); not part of `make test`.  Targets:

  image        bytes -> koclip.images.open_image, then preprocess ("clip" and "vit")
  index        format 2's meta.json + a segment (Parquet) + a deletion file (Parquet), or format 1's
               meta.json + items json + vectors .npy -> koclip.index.load_index, a search, every column
  journal      a build journal's chunk .npz -> _Journal.read / _Journal.vectors
  msgpack      flax_model.msgpack -> koclip.formats.checkpoints.read_tensors, every tensor
  safetensors  model.safetensors  -> read_tensors, every tensor
  torch        pytorch_model.bin (zip or legacy) -> read_tensors (the restricted unpickler)
  config       config.json -> checkpoints.read_config, dual_encoder_config, tower_config
  fetch        an HTTP response (status line, headers, body) -> koclip.fetch.fetch_url,
               served from 127.0.0.1 only: every connection fetch_url makes, whatever host a
               redirect names, is sent to the local server

The oracle: a call returns, or raises a KoclipError subclass whose message names the file (for
fetch: a URL).  Anything else is a finding, saved under OUT/<target>/crashes/ with its traceback
and counted once per (exception type, innermost koclip frame):

  crash     another exception type (a MemoryError counts as a memory-cap hit instead)
  unnamed   a KoclipError whose message does not name the file
  hang      an input running over --hang-s seconds (libFuzzer's -timeout)
  memory    a MemoryError under the address-space cap, or libFuzzer's RSS limit

Each target runs in its own process under RLIMIT_AS = --max-mb (default 2048 MiB; about 0.8 GiB
of it is the imported libraries), restarted after a hang or an out-of-memory death until its
--seconds are used.  It prints, per target: inputs tried, exec/s, coverage (libFuzzer's cov/ft),
and the findings.  Inputs are the natural files, except index (a container, see `_unpack_index`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("image", "index", "journal", "msgpack", "safetensors", "torch", "config", "fetch")
# Modules whose Python code atheris instruments for coverage, per target (koclip always).
_INSTRUMENT = {
    "image": ["PIL"],
    "index": ["numpy.lib.format", "numpy.lib._format_impl", "pyarrow.parquet"],
    "journal": ["numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl",
                "zipfile"],
    "torch": ["zipfile"],
    "fetch": ["http.client", "email", "urllib.parse"],
}
_MAX_LEN = {"image": 16384, "index": 8192, "journal": 16384, "msgpack": 8192, "safetensors": 8192,
            "torch": 16384, "config": 8192, "fetch": 4096}
_JOB = {"model": "m", "fingerprint": "f" * 64, "images_root": "/nonexistent", "shard": None}


# ---------------------------------------------------------------- seeds: small valid inputs

def _image_seeds() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    def save(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgb = Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    seeds = {
        "rgb.png": save(rgb, "PNG"),
        "rgba.png": save(rgb.convert("RGBA"), "PNG"),
        "la.png": save(rgb.convert("LA"), "PNG"),
        "pal.png": save(pal, "PNG"),
        "i16.png": save(Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000), "PNG"),
        "wide.png": save(Image.new("RGB", (300, 1), (9, 9, 9)), "PNG"),
        "rgb.jpg": save(rgb, "JPEG", quality=50),
        "exif.jpg": save(rgb, "JPEG", exif=exif.tobytes()),
        "cmyk.jpg": save(rgb.convert("CMYK"), "JPEG"),
        "anim.gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rgb.webp": save(rgb, "WEBP"),
        "rgb.bmp": save(rgb, "BMP"),
        "f.tif": save(Image.fromarray(np.linspace(-1, 3, 48, dtype=np.float32).reshape(6, 8)), "TIFF"),
        "rgb.tif": save(rgb, "TIFF", compression="tiff_deflate"),
    }
    return seeds


# The flag bits of an index fuzz input (see _unpack_index), and the names of its two data files.
_FORGE, _FORMAT_1, _ON_DISK = 1, 2, 4
_INDEX_NAMES = {False: ("segment.00.parquet", "deleted.00.parquet"), True: ("items.00.json", "vectors.00.npy")}


def _index_pack(flags: int, meta: bytes, first: bytes, second: bytes) -> bytes:
    return bytes([flags]) + struct.pack("<HH", len(meta), len(first)) + meta + first + second


def _parquet_footer_crc32(path: Path) -> str:
    """What format 2's meta.json records as the segment at `path`'s footer_crc32 (the reader's own
    segments._footer_crc32); of the whole file when it has no footer to check (the reader refuses it
    before comparing)."""
    from koclip.index.segments import _footer_crc32

    try:
        return _footer_crc32(path)
    except ValueError:
        return f"{zlib.crc32(path.read_bytes()):08x}"


def _forge_meta(m: dict, format_1: bool, first: bytes, second: bytes, directory: Path | None = None) -> None:
    """Point `m`'s file entries at the two data files (format 2: written in `directory`) with their
    true sizes and checksums."""
    if format_1:
        if isinstance(m.get("files"), dict):
            for key, name, blob in zip(("items", "vectors"), _INDEX_NAMES[True], (first, second)):
                m["files"][key] = {"name": name, "bytes": len(blob), "crc32": f"{zlib.crc32(blob):08x}"}
        return
    segments, deletions = m.get("segments"), m.get("deletions")
    if isinstance(segments, list) and segments and isinstance(segments[0], dict):
        segments[0].update(name=_INDEX_NAMES[False][0], bytes=len(first),
                           footer_crc32=_parquet_footer_crc32(directory / _INDEX_NAMES[False][0]))
    if isinstance(deletions, list) and deletions and isinstance(deletions[0], dict):
        deletions[0].update(name=_INDEX_NAMES[False][1], bytes=len(second), crc32=f"{zlib.crc32(second):08x}")


def _unpack_index(data: bytes, directory: Path) -> None:
    """Write an index directory from a fuzz input.

    Layout: 1 flag byte, u16 len(meta), u16 len(first), meta.json, the first data file, the second
    (the rest).  Format 2 (flag bit 1 clear): a segment, segment.00.parquet, and a deletion file,
    deleted.00.parquet; format 1 (bit 1 set): items.00.json and vectors.00.npy.  Flag bit 0: point
    meta.json's first segment and first deletion file (format 1: its "files") at the two data files
    with their true sizes and checksums (as a forger would), so the fuzzer gets past the checksums
    into the parsers.  Bit 2 is read by the target (load on_disk).
    """
    flags = data[0] if data else 0
    n_meta, n_first = struct.unpack("<HH", data[1:5].ljust(4, b"\0"))
    meta, first = data[5:5 + n_meta], data[5 + n_meta:5 + n_meta + n_first]
    second = data[5 + n_meta + n_first:]
    format_1 = bool(flags & _FORMAT_1)
    for p in directory.iterdir():
        p.unlink()
    for name, blob in zip(_INDEX_NAMES[format_1], (first, second)):
        (directory / name).write_bytes(blob)
    if flags & _FORGE:
        try:
            m = json.loads(meta)
            if isinstance(m, dict):
                _forge_meta(m, format_1, first, second, directory)
                meta = json.dumps(m).encode()
        except (ValueError, RecursionError):
            pass
    (directory / "meta.json").write_bytes(meta)


def _index_seeds() -> dict[str, bytes]:
    import numpy as np

    from koclip.index import remove_images, write_vectors_index

    def pack(out: Path, flags: int = _FORGE) -> bytes:
        """The index at `out`, its files renamed as _unpack_index names them."""
        meta = json.loads((out / "meta.json").read_bytes())
        (segment,), deletions = meta["segments"], meta["deletions"]
        second = b""
        if deletions:
            second = (out / deletions[0]["name"]).read_bytes()
            deletions[0]["name"] = _INDEX_NAMES[False][1]
        return _index_pack(flags, json.dumps(meta).encode(), (out / segment["name"]).read_bytes(), second)

    def write(out: Path, n: int, dim: int, dtype: str, paths=None, remove=()) -> Path:
        v = np.random.default_rng(n).normal(size=(n, dim))
        write_vectors_index(out, v, paths or [f"a/{i}.jpg" for i in range(n)], model="m", fingerprint="f" * 64,
                            images_root=out.parent, dtype=dtype, faiss=False, sha256=[f"{i:064x}" for i in range(n)])
        if remove:
            # The segment takes the name _unpack_index gives it before remove_images writes the
            # deletion file, which names the segment whose rows it marks.
            meta = json.loads((out / "meta.json").read_bytes())
            (out / meta["segments"][0]["name"]).rename(out / _INDEX_NAMES[False][0])
            meta["segments"][0]["name"] = _INDEX_NAMES[False][0]
            (out / "meta.json").write_text(json.dumps(meta))
            remove_images(out, list(remove))
        return out

    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        seeds["three16"] = pack(write(t / "three16.kidx", 3, 4, "float16"))
        seeds["four32-one-deleted"] = pack(write(t / "four32.kidx", 4, 3, "float32", remove=["a/1.jpg"]))
        seeds["four32-one-deleted-on-disk"] = pack(t / "four32.kidx", _FORGE | _ON_DISK)
        seeds["empty"] = pack(write(t / "empty.kidx", 0, 4, "float16"))
        # A file name that is not UTF-8 (a surrogate escape): the segment stores its bytes in path_bytes.
        seeds["path-bytes"] = pack(write(t / "bytes.kidx", 2, 4, "float16", paths=["caf\udce9.jpg", "b.jpg"]))
        # Format 1 (read-only since format 2, still loaded and searched): written by hand, as
        # koclip before segments wrote it.
        v = np.random.default_rng(0).normal(size=(3, 4))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, v)
        items = json.dumps({"path": [f"a/{i}.jpg" for i in range(3)], "size": [0] * 3, "sha256": ["0" * 64] * 3,
                            "width": [8] * 3, "height": [6] * 3}).encode()
        meta = {"format": "koclip-index", "format_version": 1, "model": "m", "fingerprint": "f" * 64, "dim": 4,
                "dtype": "float16", "count": 3, "images_root": tmp, "images_root_relative": "..",
                "files": {"items": {}, "vectors": {}, "ivf": None}, "ivf": None}
        _forge_meta(meta, True, items, buf.getvalue())
        seeds["format1-three16"] = _index_pack(_FORGE | _FORMAT_1, json.dumps(meta).encode(), items, buf.getvalue())
    return seeds


def _journal_seeds() -> dict[str, bytes]:
    import numpy as np

    from koclip.index.format import _Records
    from koclip.index.journal import _Journal

    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        j = _Journal(Path(tmp) / "j", _JOB)
        r = _Records()
        r.add("a.jpg", 10, "ab" * 32, 8, 6)
        r.add("b/c.png", 20, "cd" * 32, 1, 2)
        j.commit(r, [np.ones((2, 4), np.float32)], [("bad.jpg", "not an image")], [("d.jpg", "ab" * 32)])
        j.commit(_Records(), [], [("x.jpg", "broken")], [])
        for p in sorted((Path(tmp) / "j").glob("chunk-*.npz")):
            seeds[p.name] = p.read_bytes()
    return seeds


def _msgpack_seeds() -> dict[str, bytes]:
    import flax.serialization
    import ml_dtypes
    import numpy as np

    tree = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                                 "bias": np.zeros(3, np.float16)},
                       "bf": np.ones((2, 2), ml_dtypes.bfloat16), "scalar": np.float32(2.5),
                       "i": np.arange(4, dtype=np.int64), "c": complex(1, 2), "n": None, "t": True, "s": "x"}}
    seeds = {"plain.msgpack": flax.serialization.msgpack_serialize(tree)}
    old = flax.serialization.MAX_CHUNK_SIZE
    try:
        flax.serialization.MAX_CHUNK_SIZE = 16  # bytes: every array above is split into chunks
        seeds["chunked.msgpack"] = flax.serialization.msgpack_serialize(
            {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}})
    finally:
        flax.serialization.MAX_CHUNK_SIZE = old
    return seeds


def _safetensors_seeds() -> dict[str, bytes]:
    import ml_dtypes
    import numpy as np

    from koclip.formats import safetensors_io

    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "model.safetensors"
        safetensors_io.write(p, [("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
                                 ("b", np.ones(3, ml_dtypes.bfloat16)), ("c", np.array(True)),
                                 ("d", np.zeros((0, 2), np.int64))], metadata={"format": "pt"})
        seeds["mixed.safetensors"] = p.read_bytes()
        safetensors_io.write(p, [])
        seeds["empty.safetensors"] = p.read_bytes()
    return seeds


def _torch_seeds() -> dict[str, bytes]:
    d = ROOT / "tests" / "fixtures" / "torch_zip"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".pt", ".pth")}


def _config_seeds() -> dict[str, bytes]:
    from koclip.config import TINY

    seeds = {"koclip.json": json.dumps(TINY.to_hf()).encode()}
    for p in sorted((ROOT / "tests" / "fixtures" / "parity").rglob("config.json")):
        seeds[str(p.parent.relative_to(ROOT / "tests" / "fixtures" / "parity")).replace("/", "_")] = p.read_bytes()
    return seeds


def _fetch_seeds() -> dict[str, bytes]:
    png = _image_seeds()["rgb.png"]
    return {
        "ok": b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(png) + png,
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        "redirect": b"HTTP/1.1 302 Found\r\nLocation: /next?x=1\r\nContent-Length: 0\r\n\r\n",
        "redirect-abs": b"HTTP/1.1 301 Moved\r\nLocation: http://example.com:8080/a b\r\n\r\n",
        "short": b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\nabc",
        "big": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
        "404": b"HTTP/1.1 404 Not Found\r\n\r\nnope",
        "http09": b"ok\r\n",
    }


SEEDS = {"image": _image_seeds, "index": _index_seeds, "journal": _journal_seeds, "msgpack": _msgpack_seeds,
         "safetensors": _safetensors_seeds, "torch": _torch_seeds, "config": _config_seeds, "fetch": _fetch_seeds}


# ---------------------------------------------------------------- targets: one input -> the calls

class _Local:
    """A raw HTTP server on 127.0.0.1 answering every connection with `self.response`, and
    fetch's connect step pointed at it, so no fuzzed URL can reach another address."""

    def __init__(self):
        self.response = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(0.2)
                try:
                    got = b""
                    while b"\r\n\r\n" not in got and len(got) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                except OSError:
                    pass
                try:
                    conn.sendall(self.response)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def connect(self, t, ips, deadline):
        return socket.create_connection(("127.0.0.1", self.port), timeout=max(deadline - time.monotonic(), 0.01))


class Target:
    """`run(data)` makes the calls for one input; `named(message)` says whether an error names it."""

    def __init__(self, name: str, work: Path):
        self.name = name
        self.work = work
        self.dir = work / "ckpt"
        self.dir.mkdir(parents=True, exist_ok=True)
        getattr(self, f"_setup_{name}", lambda: None)()

    def named(self, message: str, exc: BaseException) -> bool:
        if self.name == "image":
            return "fuzz.img" in message
        if self.name == "fetch":
            return "://" in message
        if self.name == "config" and _raised_in(exc, "koclip/config.py"):
            return True  # config.py's own checks name the key and value, not the file
        return str(self.dir) in message

    def run(self, data: bytes) -> None:
        getattr(self, f"_run_{self.name}")(data)

    def _run_image(self, data):
        from koclip import images

        im = images.open_image(data, name="fuzz.img")
        images.preprocess([im], "clip")
        images.preprocess([im], "vit")

    def _setup_index(self):
        self.dir = self.work / "fuzz.kidx"
        self.dir.mkdir(exist_ok=True)

    def _run_index(self, data):
        import numpy as np

        from koclip.index import load_index

        _unpack_index(data, self.dir)
        index = load_index(self.dir, on_disk=bool(data and data[0] & _ON_DISK))
        if not (isinstance(index.dim, int) and 0 < index.dim <= 4096):
            return
        if index.on_disk:  # row groups read as the IVF's build and tail read them
            index.take(np.arange(min(index.count, 3)))
            for _ in index.blocks(0, index.stored_rows):
                pass
        index.search(np.ones(index.dim, np.float32), k=3, backend="exact")
        for column in (index.sizes, index.sha256, index.widths, index.heights):  # read on first use
            assert len(column) == index.count, (len(column), index.count)
        for _ in index.record_blocks():  # what compact and upgrade copy
            pass

    def _setup_journal(self):
        from koclip.index.journal import _Journal

        self.dir = self.work / "fuzz.kidx.partial"
        self.journal = _Journal(self.dir, _JOB)

    def _run_journal(self, data):
        from koclip.index.journal import _Journal

        (self.dir / "chunk-000001.npz").write_bytes(data)
        j = self.journal.read()
        for chunk in j["chunks"]:
            _Journal.vectors(chunk)

    def _read(self, data, file):
        from koclip.formats.checkpoints import read_tensors

        path = self.dir / file
        path.write_bytes(data)
        items, _ = read_tensors(path)
        for _name, _x in items:
            pass

    def _run_msgpack(self, data):
        self._read(data, "flax_model.msgpack")

    def _run_safetensors(self, data):
        self._read(data, "model.safetensors")

    def _run_torch(self, data):
        self._read(data, "pytorch_model.bin")

    def _run_config(self, data):
        from koclip.formats import checkpoints

        (self.dir / "config.json").write_bytes(data)
        raw = checkpoints.read_config(self.dir)
        if isinstance(raw, dict) and raw.get("model_type") in ("hybrid-clip", "vision-text-dual-encoder", "koclip"):
            checkpoints.dual_encoder_config(self.dir, raw)
        else:
            checkpoints.tower_config(self.dir)

    def _setup_fetch(self):
        from koclip import fetch

        self.server = _Local()
        fetch._connect_tcp = self.server.connect  # every connection goes to 127.0.0.1

    def _run_fetch(self, data):
        from koclip.fetch import fetch_url

        self.server.response = data
        fetch_url(f"http://127.0.0.1:{self.server.port}/image.png", max_bytes=4096, timeout=3.0,
                  max_redirects=2, allow_private=True, resolver=lambda host, port: ["127.0.0.1"])


def _work_dir(target: str, owner: int) -> Path:
    """Where each input is written as a file: in memory (/dev/shm) when there is one, as a disk
    write per input cost ~3 ms here against 0.01 ms.  `owner` (the parent's pid) keeps two runs
    at once apart."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"koclip-fuzz-{os.getuid()}-{owner}-{target}"


def _raised_in(exc: BaseException, fragment: str) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and fragment in last.replace(os.sep, "/")


def _where(exc: BaseException) -> str:
    """The innermost koclip frame of `exc`'s traceback (else the innermost frame): file:function:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/koclip/" in f.filename.replace(os.sep, "/")]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    return f"{Path(f.filename).name}:{f.name}:{f.lineno}"


_FILE_NAMES = {"msgpack": "flax_model.msgpack", "safetensors": "model.safetensors", "torch": "pytorch_model.bin",
               "config": "config.json"}


def export(target: str, data: bytes, dest: Path) -> Path:
    """Write a finding as the file(s) it stands for, for a regression test: an index directory
    (meta.json and its two data files), a config directory, or the bytes as they are."""
    if target == "index":
        dest.mkdir(parents=True, exist_ok=True)
        _unpack_index(data, dest)
    elif target == "config":
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config.json").write_bytes(data)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return dest


# ---------------------------------------------------------------- the child: one libFuzzer run

def _child(args) -> None:
    import resource

    cap = args.max_mb << 20
    # pyarrow's default allocator (mimalloc) reserves address space by the GiB as its threads start,
    # so that under the cap the first Parquet read failed ("Failed to launch worker thread"); the
    # system allocator reserves what is allocated, so the cap measures what an input costs.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import atheris

    with atheris.instrument_imports(include=["koclip", *_INSTRUMENT.get(args.target, [])]):
        import koclip.fetch  # noqa: F401
        import koclip.formats.checkpoints  # noqa: F401
        import koclip.formats.torch_zip  # noqa: F401
        import koclip.images  # noqa: F401
        import koclip.index  # noqa: F401
    import faiss  # noqa: F401  (imported lazily by the index reader: not inside the first timed input)

    from koclip.errors import KoclipError

    import logging
    logging.disable(logging.CRITICAL)  # the journal logs every unreadable chunk
    out = Path(args.out) / args.target
    crashes, corpus, seeds = out / "crashes", out / "corpus", out / "seeds"
    for d in (crashes, corpus, seeds):
        d.mkdir(parents=True, exist_ok=True)
    for name, blob in SEEDS[args.target]().items():
        (seeds / name).write_bytes(blob)
    findings = out / "findings.jsonl"
    known = set()
    if findings.exists():
        known = {json.loads(line)["signature"] for line in findings.read_text().splitlines() if line}
    work = _work_dir(args.target, args.owner or os.getpid())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target = Target(args.target, work)
    current = work / "current-input"

    def record(kind, exc, data):
        signature = f"{kind}:{type(exc).__name__}:{_where(exc)}"
        if signature in known:
            return
        known.add(signature)
        digest = hashlib.sha1(data).hexdigest()[:10]
        path = crashes / f"py-{kind}-{type(exc).__name__}-{_where(exc).replace(':', '-')}-{digest}"
        path.write_bytes(data)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        with open(findings, "a") as f:
            f.write(json.dumps({"signature": signature, "kind": kind, "input": str(path),
                                "message": str(exc)[:500], "traceback": tb}) + "\n")
        print(f"\n=== {kind}: {signature}\n    input {path}\n{tb}", file=sys.stderr, flush=True)

    def one_input(data: bytes) -> None:
        if args.save_current:
            current.write_bytes(data)
        try:
            target.run(data)
        except KoclipError as e:
            if not target.named(str(e), e):
                record("unnamed", e, data)
        except MemoryError as e:
            record("memory", e, data)
        except Exception as e:  # noqa: BLE001 - the finding itself
            record("crash", e, data)

    largest = max((len(b) for b in (p.read_bytes() for p in seeds.iterdir())), default=0)
    max_len = min(max(_MAX_LEN[args.target], largest), 65536)
    argv = [sys.argv[0], str(corpus), str(seeds), f"-max_total_time={args.seconds}", f"-timeout={args.hang_s}",
            f"-rss_limit_mb={args.max_mb}", f"-max_len={max_len}", f"-artifact_prefix={crashes}/",
            "-print_final_stats=1", "-print_pcs=0", "-reload=0"]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def _replay(target_name: str, inputs: list[str]) -> int:
    from koclip.errors import KoclipError

    work = _work_dir(target_name + "-replay", os.getpid())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target, bad = Target(target_name, work), 0
    for name in inputs:
        t0 = time.perf_counter()
        try:
            target.run(Path(name).read_bytes())
            outcome = "returned"
        except KoclipError as e:
            ok = target.named(str(e), e)
            bad += not ok
            outcome = f"{type(e).__name__}{'' if ok else ' (UNNAMED)'}: {str(e)[:300]}"
        except Exception as e:  # noqa: BLE001 - the finding
            bad += 1
            outcome = f"CRASH {type(e).__name__} at {_where(e)}: {str(e)[:300]}"
        print(f"{name}  [{time.perf_counter() - t0:.2f} s]\n    {outcome}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


# ---------------------------------------------------------------- the parent: runs, restarts, reports

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_PROGRESS = re.compile(r"cov: (\d+) ft: (\d+)")


def _fuzz_target(target: str, args) -> dict:
    out = Path(args.out) / target
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.seconds
    stats = {"target": target, "inputs": 0, "seconds": 0.0, "cov": 0, "ft": 0, "runs": 0, "hangs": 0,
             "memory": 0, "deaths": 0}
    while True:
        left = int(deadline - time.monotonic())
        if left < 5:
            break
        before = set((out / "crashes").glob("*")) if (out / "crashes").exists() else set()
        cmd = [sys.executable, __file__, "--child", target, "--seconds", str(left), "--max-mb", str(args.max_mb),
               "--hang-s", str(args.hang_s), "--out", args.out, "--owner", str(os.getpid())] + \
            (["--save-current"] if args.save_current else [])
        log = out / f"log-{stats['runs']}.txt"
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left + 120)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "killed"  # stuck where libFuzzer's own timeout could not fire
        stats["seconds"] += time.monotonic() - t0
        stats["runs"] += 1
        text = log.read_text(errors="replace")
        found = dict((k, int(v)) for k, v in _STAT.findall(text))
        stats["inputs"] += found.get("number_of_executed_units", 0)
        progress = _PROGRESS.findall(text)
        if progress:
            stats["cov"] = max(stats["cov"], int(progress[-1][0]))
            stats["ft"] = max(stats["ft"], int(progress[-1][1]))
        new = set((out / "crashes").glob("*")) - before
        artifacts = [p for p in new if p.name.startswith(("timeout-", "oom-", "crash-", "slow-unit-"))]
        if "number_of_executed_units" not in found:
            # Died without final stats (a hang, a libFuzzer OOM or a deadly signal): count what
            # it got through from its last progress line.
            execs = re.findall(r"^#(\d+)\s", text, re.M)
            stats["inputs"] += int(execs[-1]) if execs else 0
        for p in artifacts:
            kind = "hangs" if p.name.startswith(("timeout-", "slow-unit-")) else \
                "memory" if p.name.startswith("oom-") else "deaths"
            stats[kind] += 1
            print(f"  {target}: {kind[:-1] if kind != 'memory' else 'memory cap hit'}: {p}", flush=True)
        if rc == "killed":
            stats["hangs"] += 1
            cur = _work_dir(target, os.getpid()) / "current-input"
            if cur.exists():
                keep = out / "crashes" / f"timeout-killed-{hashlib.sha1(cur.read_bytes()).hexdigest()[:10]}"
                shutil.copy(cur, keep)
                print(f"  {target}: hang (killed): {keep}", flush=True)
        if rc == 0 or not artifacts and rc != "killed":
            break  # a normal end (or an error in the harness: see the log)
    shutil.rmtree(_work_dir(target, os.getpid()), ignore_errors=True)
    findings = []
    f = out / "findings.jsonl"
    if f.exists():
        findings = [json.loads(line) for line in f.read_text().splitlines() if line]
    stats["crash"] = sum(x["kind"] == "crash" for x in findings)
    stats["memory"] += sum(x["kind"] == "memory" for x in findings)
    stats["unnamed"] = sum(x["kind"] == "unnamed" for x in findings)
    stats["findings"] = findings
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS + ("all",), nargs="?")
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    p.add_argument("--max-mb", type=int, default=2048, help="address-space cap per process, MiB (default 2048)")
    p.add_argument("--hang-s", type=int, default=5, help="an input running longer is a hang (default 5)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "koclip-fuzz"),
                   help="corpus, crashes and logs go under OUT/<target>/ (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="forget earlier corpora and findings under OUT")
    p.add_argument("--save-current", action="store_true",
                   help="write each input to OUT/<target>/current-input first (finds inputs that hang in C)")
    p.add_argument("--export", nargs=2, metavar=("INPUT", "DEST"),
                   help="write the fuzz input INPUT of TARGET as the file(s) it stands for, at DEST")
    p.add_argument("--replay", nargs="+", metavar="INPUT",
                   help="run TARGET on these inputs once each (no fuzzing, no cap) and say what each raised")
    p.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    p.add_argument("--owner", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export:
        print(export(args.target, Path(args.export[0]).read_bytes(), Path(args.export[1])))
        return 0
    if args.replay:
        return _replay(args.target, args.replay)
    if args.child:
        args.target = args.child
        _child(args)
        return 0
    if not args.target:
        p.error("name a target or 'all'")
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.fresh:
        for t in targets:
            shutil.rmtree(Path(args.out) / t, ignore_errors=True)
    print(f"fuzzing {', '.join(targets)} for {args.seconds} s each; cap {args.max_mb} MiB address space, "
          f"hang limit {args.hang_s} s; output under {args.out}", flush=True)
    rows = []
    for t in targets:
        print(f"- {t} ...", flush=True)
        rows.append(_fuzz_target(t, args))
    print(f"\n{'target':12} {'inputs':>10} {'seconds':>8} {'exec/s':>8} {'cov':>6} {'ft':>6} "
          f"{'crashes':>8} {'unnamed':>8} {'hangs':>6} {'memory':>7}")
    for r in rows:
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0.0
        print(f"{r['target']:12} {r['inputs']:>10,} {r['seconds']:>8.0f} {rate:>8.0f} {r['cov']:>6} {r['ft']:>6} "
              f"{r['crash']:>8} {r['unnamed']:>8} {r['hangs']:>6} {r['memory']:>7}")
    for r in rows:
        for x in r["findings"]:
            print(f"  {r['target']}: {x['kind']} {x['signature']}\n      {x['message'][:200]!r}\n      {x['input']}")
    return 1 if any(r["findings"] or r["hangs"] or r["memory"] or r["deaths"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
