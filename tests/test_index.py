"""Tests for koclip.index: build, store, load, search, resume, shard, merge, add.

What is particular to format 2 (segments, deletions, upgrade, on-disk IVF) is in test_index_format.py."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from koclip import index as kidx
from koclip.errors import IndexFileError
from koclip.index import add_images, build_index, load_index, merge_indexes, scan_images
from numerics import U16, reduction_rtol, unit_norm_atol

# Stored vectors and scores (tests/numerics.py).  The index renormalises each vector it is given
# (relative change <= the vector's own distance from unit length plus the new normalisation's
# rounding: 2 unit_norm_atol(d)), then a float16 index rounds each entry (U16 relative; half the
# subnormal spacing, 2**-25, absolute below 2**-14).
STORED_RTOL = U16 + 2 * unit_norm_atol(16)
F16_SUBNORMAL = 2.0 ** -25


class TinyEmbedder:
    """A real, deterministic image model: 8x8 RGB thumbnail (centred) -> fixed random projection
    to 16-d -> L2 norm.  Similar pictures get similar vectors, so search results can be checked.

    The projection and norm are summed in a fixed order with elementwise float32 operations (no BLAS,
    whose kernels, and so whose order of additions, depend on the CPU and the batch's size): an image's
    vector is the same bits in any batch, so builds with other batch sizes store identical indexes.
    """

    name = "tiny"
    dim = 16

    def __init__(self, fingerprint="tiny-v1", fail_after=None, delay=0.0):
        self.fingerprint = fingerprint
        self.fail_after = fail_after  # raise on encode call number fail_after + 1
        self.delay = delay  # seconds per preprocess and per encode call, like a real model's cost
        self.proj = np.random.default_rng(0).standard_normal((8 * 8 * 3, self.dim)).astype(np.float32)
        self.encoded = 0
        self.calls = 0

    def preprocess(self, images):
        time.sleep(self.delay)
        return np.stack([np.asarray(im.resize((8, 8), Image.Resampling.BILINEAR), np.float32).ravel() / 255 - 0.5
                         for im in images])

    def encode_pixels(self, pixels):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash in the model")
        time.sleep(self.delay)
        self.encoded += len(pixels)
        pixels = np.asarray(pixels, np.float32)
        z = np.zeros((len(pixels), self.dim), np.float32)
        for k in range(pixels.shape[1]):
            z += pixels[:, k:k + 1] * self.proj[k]
        squares = z * z
        total = np.zeros((len(z), 1), np.float32)
        for j in range(self.dim):
            total += squares[:, j:j + 1]
        return z / np.sqrt(total)

    def embed(self, images):
        return self.encode_pixels(self.preprocess(images))


def solid(rgb, size=(24, 16)):
    return Image.new("RGB", size, rgb)


def noise(seed, size=(20, 20)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_photos(root: Path) -> dict[str, Image.Image]:
    """20 small images in nested folders (PNG, and JPEG with an upper-case suffix); returns rel path -> image."""
    images = {
        "reds/red.png": solid((230, 20, 20)),
        "reds/dark red.png": solid((150, 10, 15)),
        "reds/sub/pinkish red.PNG": solid((240, 60, 60), (30, 30)),
        "blues/blue.png": solid((20, 30, 220)),
        "blues/navy.png": solid((10, 10, 120)),
        "greens/green.png": solid((20, 200, 40)),
        "greens/olive.png": solid((110, 140, 30)),
        "grey.bmp": solid((128, 128, 128)),
        "사진/고양이.png": noise(100),
    }
    for i in range(11):
        images[f"noise/n{i:02d}.png"] = noise(i)
    for rel, im in images.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p)
    return images


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    return root, make_photos(root)


def build(emb, root, out, **kw):
    kw.setdefault("progress", False)
    return build_index(emb, root, out, **kw)


# ---------------------------------------------------------------- scanning

def test_scan_is_recursive_sorted_case_insensitive_and_skips_hidden_and_non_images(tmp_path):
    for rel in ["b/x.JPG", "a.png", "a/z.TiFF", "notes.txt", ".hidden.png", ".cache/c.png", "c.webp", "d.gif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert scan_images(tmp_path) == ["a.png", "a/z.TiFF", "b/x.JPG", "c.webp", "d.gif"]


# ---------------------------------------------------------------- store

def test_file_names_that_are_not_utf8_round_trip(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as old cameras and zip files leave them
    solid((5, 5, 5)).save(root / name)
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    index = load_index(tmp_path / "p.kidx")
    assert index.paths == [name] and index.full_path(name).is_file()


def test_round_trip_keeps_vectors_and_per_image_records(photos, tmp_path):
    root, images = photos
    emb = TinyEmbedder()
    report = build(emb, root, tmp_path / "p.kidx")
    index = load_index(tmp_path / "p.kidx", emb)
    assert report.count == index.count == len(images) and not report.skipped
    assert index.paths == sorted(images)
    expected = emb.embed([images[p] for p in index.paths])
    assert index.vectors.dtype == np.float16
    # The build's model output is these same bits (see TinyEmbedder): renormalised, then float16.
    np.testing.assert_allclose(index.vectors.astype(np.float32), expected, rtol=STORED_RTOL, atol=F16_SUBNORMAL)
    i = index.paths.index("reds/sub/pinkish red.PNG")
    assert (index.widths[i], index.heights[i]) == (30, 30)
    assert index.sizes[i] == (root / index.paths[i]).stat().st_size
    assert index.sha256[i] == hashlib.sha256((root / index.paths[i]).read_bytes()).hexdigest()
    meta = json.loads((tmp_path / "p.kidx" / "meta.json").read_text())
    keys = ("model", "fingerprint", "dim", "dtype", "count", "normalised", "format_version")
    assert {k: meta[k] for k in keys} == {"model": "tiny", "fingerprint": "tiny-v1", "dim": 16, "dtype": "float16",
                                          "count": len(images), "normalised": True, "format_version": 2}
    assert index.full_path(index.paths[i]) == root.resolve() / "reds/sub/pinkish red.PNG"


def test_an_index_moved_with_its_photos_finds_them_and_one_moved_alone_keeps_the_old_place(tmp_path):
    project = tmp_path / "project"
    make_photos(project / "photos")
    emb = TinyEmbedder()
    build(emb, project / "photos", project / "indexes" / "p.kidx")
    moved = tmp_path / "clone"
    shutil.copytree(project, moved)  # as a git clone elsewhere would be
    index = load_index(moved / "indexes" / "p.kidx", emb)
    assert index.root == moved / "photos"
    assert index.full_path("reds/red.png").is_file()
    report = add_images(moved / "indexes" / "p.kidx", emb, moved / "photos", progress=False)
    assert (report.indexed, report.embedded, report.count) == (0, 0, 20)
    # The index alone, copied away from any photos: the absolute path recorded at build time.
    shutil.copytree(project / "indexes" / "p.kidx", tmp_path / "alone.kidx")
    assert load_index(tmp_path / "alone.kidx", emb).root == (project / "photos").resolve()


def test_float32_index_stores_the_model_output_exactly(photos, tmp_path):
    root, images = photos
    emb = TinyEmbedder()
    build(emb, root, tmp_path / "p.kidx", dtype="float32")
    index = load_index(tmp_path / "p.kidx")
    assert index.vectors.dtype == np.float32
    # The model's own bits, renormalised by the index: within 2 unit_norm_atol(16) of each entry.
    np.testing.assert_allclose(index.vectors, emb.embed([images[p] for p in index.paths]),
                               rtol=2 * unit_norm_atol(16), atol=0)


def test_rebuilding_replaces_the_index_and_leaves_no_stray_files(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    (root / "noise/n00.png").unlink()
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    assert load_index(tmp_path / "p.kidx").count == len(images) - 1
    names = sorted(p.name.split(".")[0] for p in (tmp_path / "p.kidx").iterdir() if p.name != ".lock")
    assert names == ["meta", "segment"]
    assert not (tmp_path / "p.kidx.partial").exists()


def test_writing_over_a_folder_that_is_not_an_index_is_refused(photos, tmp_path):
    root, _ = photos
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(IndexFileError, match="not a koclip index"):
        build(TinyEmbedder(), root, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.docx").read_bytes() == b"precious"


# ---------------------------------------------------------------- integrity errors

@pytest.fixture
def built(photos, tmp_path):
    build(TinyEmbedder(), photos[0], tmp_path / "p.kidx")
    return tmp_path / "p.kidx"


def data_file(index_dir: Path, stem: str) -> Path:
    return next(index_dir.glob(f"{stem}.*"))


def test_fingerprint_mismatch_names_both_models(built):
    other = TinyEmbedder(fingerprint="tiny-v2-other-preprocessing")
    with pytest.raises(IndexFileError, match=r"built with model 'tiny' \(fingerprint tiny-v1.*"
                                             r"loaded model is 'tiny' \(fingerprint tiny-v2-other"):
        load_index(built, other)


def test_truncated_segment_is_reported(built):
    p = data_file(built, "segment")
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(built)


def page_byte(segment: Path, column: str) -> int:
    """An offset inside the data of `column`'s first data page (past its page header)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(segment).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith(column))
    return chunk.data_page_offset + chunk.total_compressed_size - 8


def test_flipped_byte_in_the_vectors_fails_their_page_checksum(built):
    p = data_file(built, "segment")
    data = bytearray(p.read_bytes())
    data[page_byte(p, "vector")] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="segment .* is corrupt.*CRC checksum"):
        load_index(built)


def test_flipped_byte_in_the_paths_fails_their_page_checksum(built):
    p = data_file(built, "segment")
    data = bytearray(p.read_bytes())
    data[page_byte(p, "path")] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="segment .* is corrupt.*'path'.*CRC checksum"):
        load_index(built)


def test_flipped_byte_in_a_segment_footer_fails_its_checksum(built):
    p = data_file(built, "segment")
    data = bytearray(p.read_bytes())
    data[-20] ^= 0x01  # inside the footer: Parquet's metadata, which no page checksum covers
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="fails its checksum .footer crc32"):
        load_index(built)


@pytest.fixture
def v1_index(tmp_path):
    """A copy of the committed gallery index, which is format 1 (vectors .npy + items .json)."""
    out = tmp_path / "v1.kidx"
    shutil.copytree(Path(__file__).parent.parent / "embeddings" / "gallery-koclip-mini.kidx", out)
    assert json.loads((out / "meta.json").read_text())["format_version"] == 1
    return out


def test_truncated_format_1_vectors_file_is_reported(v1_index):
    p = data_file(v1_index, "vectors")
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(v1_index)


def test_flipped_byte_in_format_1_vectors_fails_the_checksum(v1_index):
    p = data_file(v1_index, "vectors")
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(v1_index)


def test_corrupt_format_1_items_file_is_reported(v1_index):
    p = data_file(v1_index, "items")
    p.write_bytes(p.read_bytes().replace(b"beach", b"bench", 1))
    with pytest.raises(IndexFileError, match="items file .* corrupt"):
        load_index(v1_index)


def test_truncated_meta_json_is_reported(built):
    p = built / "meta.json"
    p.write_text(p.read_text()[:100])
    with pytest.raises(IndexFileError, match="not valid JSON"):
        load_index(built)


def test_a_data_file_gone_once_is_read_again_and_gone_twice_is_reported(built, monkeypatch):
    # A writer's commit may delete the files that the meta.json just read names: read it again once.
    from koclip.index import search

    real, calls = search.open_segment, []

    def vanishing(path, *args, gone=1):
        calls.append(path)
        if len(calls) <= gone:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *args)

    monkeypatch.setattr(search, "open_segment", vanishing)
    assert load_index(built).count == 20 and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(search, "open_segment", lambda path, *a: vanishing(path, *a, gone=2))
    with pytest.raises(IndexFileError, match=r"lacks a data file that meta.json names: .*segment"):
        load_index(built)
    assert len(calls) == 2


def test_missing_index_says_so(tmp_path):
    with pytest.raises(IndexFileError, match="does not exist"):
        load_index(tmp_path / "nope.kidx")


# ---------------------------------------------------------------- search

def test_every_image_is_its_own_nearest_neighbour(photos, built):
    _, images = photos
    emb = TinyEmbedder()
    index = load_index(built, emb)
    hits = index.search(emb.embed([images[p] for p in index.paths]), k=3)
    assert [h[0].path for h in hits] == index.paths
    # An image's own score: |v|^2 (2 unit_norm_atol), the query's renormalisation (2 more), its stored
    # copy (STORED_RTOL) and the 16-term float32 dot: at least 1 minus their sum.
    self_score = 1 - (STORED_RTOL + 4 * unit_norm_atol(16) + reduction_rtol(16))
    assert all(h[0].score >= self_score and [r.rank for r in h] == [1, 2, 3] for h in hits)


def test_a_red_query_finds_the_red_images(built):
    emb = TinyEmbedder()
    hits = load_index(built, emb).search(emb.embed([solid((200, 40, 30), (50, 50))])[0], k=3)
    assert sorted(h.path for h in hits) == ["reds/dark red.png", "reds/red.png", "reds/sub/pinkish red.PNG"]
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_exact_search_matches_a_numpy_reference(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((500, 24)).astype(np.float32)
    index = kidx.write_vectors_index(tmp_path / "v.kidx", v, [f"{i:03d}.jpg" for i in range(500)],
                                     model="m", fingerprint="f")
    q = rng.standard_normal((4, 24)).astype(np.float32) * 3  # scale does not matter
    stored = index.vectors.astype(np.float32)
    ref = (stored @ (q / np.linalg.norm(q, axis=1, keepdims=True)).T).T
    hits = index.search(q, k=7, backend="exact")
    # Scores of the same stored codes: the query normalised twice (2 unit_norm_atol(24)) and two 24-term
    # float32 dots (2 gamma_24), relative to sum|stored q| <= |stored| |q| <= 1 + U16.
    atol = (reduction_rtol(24, depth=2) + 2 * unit_norm_atol(24)) * (1 + U16)
    for row, h in zip(ref, hits):
        order = np.argsort(-row)[:7]
        assert np.diff(-row[np.argsort(-row)[:8]]).min() > 2 * atol  # no near-ties: one order on any CPU
        assert [x.path for x in h] == [f"{i:03d}.jpg" for i in order]
        np.testing.assert_allclose([x.score for x in h], row[order], rtol=0, atol=atol)


def test_k_larger_than_the_index_returns_every_image(built):
    index = load_index(built)
    assert len(index.search(np.ones(16), k=1000)) == index.count


def test_query_of_the_wrong_dimension_is_refused(built):
    with pytest.raises(ValueError, match=r"shape \(16,\) or \(m, 16\)"):
        load_index(built).search(np.ones(15))


def test_faiss_backend_reaches_the_recall_target(tmp_path):
    # Clustered vectors (like real embeddings), 3000 x 32, queries near the data.
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((60, 32))
    v = centres[rng.integers(0, 60, 3000)] + 0.6 * rng.standard_normal((3000, 32))
    index = kidx.write_vectors_index(tmp_path / "v.kidx", v, [f"{i}" for i in range(3000)],
                                     model="m", fingerprint="f", faiss=True)
    q = centres[rng.integers(0, 60, 100)] + 0.8 * rng.standard_normal((100, 32))
    exact = index.search(q, k=10, backend="exact")
    approx = load_index(tmp_path / "v.kidx").search(q, k=10, backend="faiss")
    recall = np.mean([len({h.path for h in a} & {h.path for h in e}) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95
    params = index.ivf_params
    assert params["nprobe"] < params["nlist"]  # it did not just scan everything
    assert data_file(tmp_path / "v.kidx", "ivf").stat().st_size > 0


def test_faiss_index_is_built_on_demand_and_saved(tmp_path):
    v = np.random.default_rng(3).standard_normal((400, 8))
    kidx.write_vectors_index(tmp_path / "v.kidx", v, [str(i) for i in range(400)], model="m", fingerprint="f")
    load_index(tmp_path / "v.kidx").search(v[0], backend="faiss")
    again = load_index(tmp_path / "v.kidx")
    assert again.ivf_params and again.search(v[0], k=1, backend="faiss")[0].path == "0"


# ---------------------------------------------------------------- unreadable images

def test_unreadable_images_are_skipped_and_listed(photos, tmp_path):
    root, images = photos
    (root / "bad").mkdir()
    (root / "bad/notes.jpg").write_text("not an image")
    (root / "bad/empty.png").write_bytes(b"")
    good = (root / "reds/red.png").read_bytes()
    (root / "bad/cut.png").write_bytes(good[: len(good) // 2])
    report = build(TinyEmbedder(), root, tmp_path / "p.kidx")
    assert [p for p, _ in report.skipped] == ["bad/cut.png", "bad/empty.png", "bad/notes.jpg"]
    assert all(reason for _, reason in report.skipped)
    assert "empty" in dict(report.skipped)["bad/empty.png"]
    assert load_index(tmp_path / "p.kidx").count == len(images)


# ---------------------------------------------------------------- resume

def assert_same_index(a, b):
    assert a.paths == b.paths and a.sha256 == b.sha256
    np.testing.assert_array_equal(a.vectors, b.vectors)


def test_build_resumes_after_a_crash_without_redoing_or_losing_work(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "clean.kidx", batch_size=3)
    crashing = TinyEmbedder(fail_after=3)  # dies on the 4th batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(crashing, root, tmp_path / "p.kidx", batch_size=3, checkpoint_every=3)
    assert not (tmp_path / "p.kidx" / "meta.json").exists()
    assert crashing.encoded == 9
    second = TinyEmbedder()
    report = build(second, root, tmp_path / "p.kidx", batch_size=3, checkpoint_every=3)
    assert report.resumed == 9 and second.encoded == len(images) - 9 == report.embedded
    assert_same_index(load_index(tmp_path / "p.kidx"), load_index(tmp_path / "clean.kidx"))


def test_resume_ignores_half_written_temp_files_and_redoes_a_damaged_chunk(photos, tmp_path):
    root, images = photos
    with pytest.raises(RuntimeError):
        build(TinyEmbedder(fail_after=4), root, tmp_path / "p.kidx", batch_size=2, checkpoint_every=2)
    journal = tmp_path / "p.kidx.partial"
    chunks = sorted(journal.glob("chunk-*.npz"))
    assert len(chunks) == 4
    # A write killed half-way leaves a temp file; disk damage could truncate a chunk.
    (journal / ".chunk-000005.npz.1234abcd.tmp").write_bytes(chunks[0].read_bytes()[:300])
    chunks[1].write_bytes(chunks[1].read_bytes()[:300])
    second = TinyEmbedder()
    report = build(second, root, tmp_path / "p.kidx", batch_size=2)
    assert report.resumed == 6 and second.encoded == len(images) - 6
    build(TinyEmbedder(), root, tmp_path / "clean.kidx")
    assert_same_index(load_index(tmp_path / "p.kidx"), load_index(tmp_path / "clean.kidx"))


def test_build_killed_with_sigkill_resumes(photos, tmp_path):
    root, images = photos
    script = tmp_path / "run_build.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_index import TinyEmbedder
        from koclip.index import build_index
        build_index(TinyEmbedder(delay=0.15), {str(root)!r}, {str(tmp_path / "p.kidx")!r},
                    batch_size=2, checkpoint_every=2, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).parent.parent)
    journal = tmp_path / "p.kidx.partial"
    deadline = time.monotonic() + 60
    while len(list(journal.glob("chunk-*.npz"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "p.kidx" / "meta.json").exists()
    second = TinyEmbedder()
    report = build(second, root, tmp_path / "p.kidx", batch_size=2)
    assert report.resumed >= 4 and second.encoded == len(images) - report.resumed
    build(TinyEmbedder(), root, tmp_path / "clean.kidx")
    assert_same_index(load_index(tmp_path / "p.kidx"), load_index(tmp_path / "clean.kidx"))


def test_crash_while_writing_the_index_keeps_the_old_one(photos, tmp_path, monkeypatch):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    solid((1, 2, 3)).save(root / "more.png")

    def die(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("koclip.index.ops._commit_meta", die)
    with pytest.raises(KeyboardInterrupt):
        build(TinyEmbedder(), root, tmp_path / "p.kidx")
    assert load_index(tmp_path / "p.kidx").count == len(images)  # old index intact
    monkeypatch.undo()
    second = TinyEmbedder()
    report = build(second, root, tmp_path / "p.kidx")
    assert second.encoded == 0 and report.count == len(images) + 1


def test_crash_while_writing_a_first_index_can_be_rerun(photos, tmp_path, monkeypatch):
    root, images = photos
    monkeypatch.setattr("koclip.index.ops._commit_meta", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build(TinyEmbedder(), root, tmp_path / "p.kidx")
    monkeypatch.undo()
    with pytest.raises(IndexFileError, match="interrupted"):
        load_index(tmp_path / "p.kidx")
    assert build(TinyEmbedder(), root, tmp_path / "p.kidx").count == len(images)


def test_journal_of_another_model_is_not_mixed_in(photos, tmp_path):
    root, _ = photos
    with pytest.raises(RuntimeError):
        build(TinyEmbedder(fail_after=1), root, tmp_path / "p.kidx", batch_size=2, checkpoint_every=2)
    with pytest.raises(IndexFileError, match="unfinished .*tiny-v1.*delete"):
        build(TinyEmbedder(fingerprint="other"), root, tmp_path / "p.kidx")


class OverlapProbe(TinyEmbedder):
    """A model whose calls only go ahead when loading runs beside them, never before or after.

    `batch_of` maps an image's pixel bytes to its batch.  Preprocessing batch b >= 1 waits until
    the model has begun batch b - 1, and the model's call for batch k waits until preprocessing of
    batch k + 1 has begun: both waits end only if the two really run at the same time.  Loading in
    the model's thread (before or after its call) leaves one side waiting for the other; the
    timeout is a hang guard, not a speed bound.  What is recorded is the order of events, which
    no CPU's speed changes.
    """

    HANG_GUARD_S = 30

    def __init__(self, batch_of: dict, batches: int):
        super().__init__()
        self.batch_of, self.batches = batch_of, batches
        self.events = threading.Condition()
        self.loading, self.encoding = set(), set()  # batches whose preprocessing / model call has begun
        self.missed = []  # waits that ended at the hang guard: (side, batch)

    def _wait(self, side, b, ready):
        with self.events:
            self.events.notify_all()
            guard = 0 if self.missed else self.HANG_GUARD_S  # after one miss, fail fast
            if not self.events.wait_for(ready, guard):
                self.missed.append((side, b))

    def preprocess(self, images):
        b = self.batch_of[images[0].tobytes()]
        with self.events:
            self.loading.add(b)
        if b > 0:
            self._wait("preprocess", b, lambda: b - 1 in self.encoding)
        return super().preprocess(images)

    def encode_pixels(self, pixels):
        k = self.calls  # batches go through the model in order
        with self.events:
            self.encoding.add(k)
        if k < self.batches - 1:
            self._wait("model", k, lambda: k + 1 in self.loading)
        return super().encode_pixels(pixels)


def test_loading_overlaps_with_the_model(photos, tmp_path):
    # 20 images in 10 batches: preprocessing batch k + 1 and the model's call for batch k overlap in time.
    root, images = photos
    probe = OverlapProbe({images[p].tobytes(): i // 2 for i, p in enumerate(sorted(images))}, batches=10)
    report = build(probe, root, tmp_path / "p.kidx", batch_size=2)
    assert probe.missed == [], "loading and the model took turns instead of running side by side"
    assert probe.calls == 10 and report.embedded == len(images) == 20
    assert 0 < report.model_seconds <= report.pipeline_seconds  # the model's time is part of the loop's


# ---------------------------------------------------------------- shards and merge

def test_shards_are_disjoint_cover_everything_and_merge_to_the_full_build(photos, tmp_path):
    root, images = photos
    # A copy of red.png in another shard: only the merge can see that it is a duplicate.
    red_shard = next(i for i in (1, 2, 3) if kidx.in_shard("reds/red.png", (i, 3)))
    copy = next(f"copy {i}.png" for i in range(99) if not kidx.in_shard(f"copy {i}.png", (red_shard, 3)))
    shutil.copy(root / "reds/red.png", root / copy)
    full = build(TinyEmbedder(), root, tmp_path / "full.kidx")
    parts = [tmp_path / f"part{i}.kidx" for i in (1, 2, 3)]
    for i, p in enumerate(parts, 1):
        build(TinyEmbedder(), root, p, shard=f"{i}/3")
    shards = [set(load_index(p).paths) for p in parts]
    assert all(shards) and sum(map(len, shards)) == len(set().union(*shards)) == len(images) + 1
    report = merge_indexes(parts, tmp_path / "merged.kidx")
    assert full.duplicates == [("reds/red.png", copy)] == report.duplicates
    assert_same_index(load_index(tmp_path / "merged.kidx"), load_index(tmp_path / "full.kidx"))


def test_merge_refuses_indexes_of_different_models(photos, tmp_path):
    root, _ = photos
    build(TinyEmbedder(), root, tmp_path / "a.kidx", shard="1/2")
    build(TinyEmbedder(fingerprint="v2"), root, tmp_path / "b.kidx", shard="2/2")
    with pytest.raises(IndexFileError, match="same model"):
        merge_indexes([tmp_path / "a.kidx", tmp_path / "b.kidx"], tmp_path / "m.kidx")


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1-3", "x"])
def test_bad_shard_spec_is_refused(bad):
    with pytest.raises(ValueError, match="shard"):
        kidx.parse_shard(bad)


# ---------------------------------------------------------------- add

def test_add_stores_each_content_once(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(root / "reds/red.png", new / "red again.png")
    solid((250, 250, 0)).save(new / "yellow.png")
    emb = TinyEmbedder()
    report = add_images(tmp_path / "p.kidx", emb, new, progress=False)
    assert report.indexed == 1 and emb.encoded == 1
    assert [p for p, kept in report.duplicates] == [str((new / "red again.png").resolve().as_posix())]
    index = load_index(tmp_path / "p.kidx")
    assert index.count == len(images) + 1 and index.paths[-1].endswith("new/yellow.png")
    again = add_images(tmp_path / "p.kidx", TinyEmbedder(), [new / "yellow.png"], progress=False)
    assert again.indexed == 0 and load_index(tmp_path / "p.kidx").count == len(images) + 1


def test_add_replaces_the_vector_of_a_changed_file(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    solid((0, 0, 255)).save(root / "grey.bmp")  # the grey picture is now blue
    emb = TinyEmbedder()
    report = add_images(tmp_path / "p.kidx", emb, root, progress=False)
    index = load_index(tmp_path / "p.kidx", emb)
    assert report.indexed == 1 and index.count == len(images)
    assert index.search(emb.embed([solid((0, 0, 255))])[0], k=1)[0].path == "grey.bmp"


def test_add_keeps_the_faiss_index_in_step(tmp_path):
    rng = np.random.default_rng(4)
    v = rng.standard_normal((600, 16))
    kidx.write_vectors_index(tmp_path / "v.kidx", v, [f"{i:04d}" for i in range(600)], model="tiny",
                             fingerprint="tiny-v1", faiss=True, images_root=tmp_path)
    solid((9, 200, 9)).save(tmp_path / "g.png")
    emb = TinyEmbedder()
    add_images(tmp_path / "v.kidx", emb, [tmp_path / "g.png"], progress=False)
    index = load_index(tmp_path / "v.kidx")
    assert index.count == 601 and index.ivf_params
    q = emb.embed([solid((9, 200, 9))])[0]
    assert index.search(q, k=1, backend="faiss")[0].path == "g.png"


# ---------------------------------------------------------------- remove

def test_remove_by_stored_or_file_path_drops_exactly_those_rows(photos, tmp_path):
    root, images = photos
    emb = TinyEmbedder()
    build(emb, root, tmp_path / "p.kidx")
    before = load_index(tmp_path / "p.kidx")
    vec_of = {p: before.vectors[i].copy() for i, p in enumerate(before.paths)}
    done = kidx.remove_images(tmp_path / "p.kidx", ["reds/red.png", root / "blues" / "navy.png"])
    assert done.paths == ["blues/navy.png", "reds/red.png"] and done.count == len(images) - 2
    index = load_index(tmp_path / "p.kidx", emb)
    assert index.paths == sorted(set(images) - {"reds/red.png", "blues/navy.png"})
    for i, p in enumerate(index.paths):  # every kept row keeps its own vector and record
        np.testing.assert_array_equal(index.vectors[i], vec_of[p])
        assert index.sha256[i] == before.sha256[before.paths.index(p)]
    hits = index.search(emb.embed([solid((230, 20, 20))])[0], k=len(images))
    assert "reds/red.png" not in [h.path for h in hits]
    # The removed picture is new content again: adding it back embeds it.
    assert add_images(tmp_path / "p.kidx", TinyEmbedder(), [root / "reds/red.png"], progress=False).indexed == 1


def test_remove_missing_drops_the_images_whose_files_are_gone(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    (root / "grey.bmp").unlink()
    shutil.rmtree(root / "greens")
    done = kidx.remove_images(tmp_path / "p.kidx", missing=True)
    assert done.paths == ["greens/green.png", "greens/olive.png", "grey.bmp"]
    assert load_index(tmp_path / "p.kidx").count == len(images) - 3
    assert kidx.remove_images(tmp_path / "p.kidx", missing=True) == kidx.Removed([], len(images) - 3)


def test_remove_of_an_unknown_path_changes_nothing(photos, tmp_path):
    root, images = photos
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    meta = (tmp_path / "p.kidx" / "meta.json").read_bytes()
    with pytest.raises(ValueError, match=r"1 of the paths to remove are not in .*'nope.png'.*nothing was removed"):
        kidx.remove_images(tmp_path / "p.kidx", ["reds/red.png", "nope.png"])
    assert (tmp_path / "p.kidx" / "meta.json").read_bytes() == meta
    assert load_index(tmp_path / "p.kidx").count == len(images)


def test_removed_rows_leave_the_faiss_index_searching_what_is_left(tmp_path):
    v = np.random.default_rng(5).standard_normal((600, 16))
    kidx.write_vectors_index(tmp_path / "v.kidx", v, [f"{i:04d}" for i in range(600)], model="tiny",
                             fingerprint="tiny-v1", faiss=True, images_root=tmp_path)
    kidx.remove_images(tmp_path / "v.kidx", [f"{i:04d}" for i in range(0, 600, 2)])
    index = load_index(tmp_path / "v.kidx")
    assert index.count == 300 and index.ivf_params
    for odd in (1, 301, 599):  # each kept vector still finds itself through the IVF
        q = v[odd] / np.linalg.norm(v[odd])
        assert index.search(q, k=1, backend="faiss")[0].path == f"{odd:04d}"
    kidx.remove_images(tmp_path / "v.kidx", index.paths)
    assert load_index(tmp_path / "v.kidx").count == 0


# ---------------------------------------------------------------- CLI

def test_cli_builds_merges_and_adds(photos, tmp_path, monkeypatch, capsys):
    import koclip
    from koclip.cli import main

    root, images = photos
    monkeypatch.setattr(koclip, "load_embedder", lambda name: TinyEmbedder(), raising=False)
    for i in (1, 2):
        assert main(["index", "build", "--model", "tiny", "--images", str(root), "--out",
                     str(tmp_path / f"p{i}.kidx"), "--shard", f"{i}/2", "--batch-size", "4", "--no-progress"]) == 0
    assert main(["index", "merge", str(tmp_path / "all.kidx"), str(tmp_path / "p1.kidx"),
                 str(tmp_path / "p2.kidx")]) == 0
    assert load_index(tmp_path / "all.kidx").count == len(images)
    assert main(["index", "info", str(tmp_path / "all.kidx")]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["index", "merge", str(tmp_path / "x.kidx"), str(tmp_path / "missing.kidx")]) == 2
    assert main(["index", "remove", str(tmp_path / "all.kidx"), "grey.bmp"]) == 0
    assert "1 image removed, 19 left" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give the paths to remove, or --missing"):
        main(["index", "remove", str(tmp_path / "all.kidx")])
