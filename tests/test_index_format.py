"""Format 2 of koclip.index: Parquet segments and deletion files, what each writer writes, reading
an index with pyarrow alone, format 1 (read-only) and its upgrade, and the IVF in parts, on disk."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koclip import index as kidx
from koclip.errors import IndexFileError
from koclip.index import add_images, build_index, compact_index, load_index, remove_images, upgrade_index
from koclip.index import ivf as kivf
from numerics import U16, reduction_rtol
from test_index import TinyEmbedder, make_photos, noise, solid

GALLERY = Path(__file__).resolve().parent.parent / "embeddings" / "gallery-koclip-mini.kidx"


def build(emb, root, out, **kw):
    kw.setdefault("progress", False)
    return build_index(emb, root, out, **kw)


@pytest.fixture
def gallery(tmp_path):
    """A 20-image index, and a folder of 3 more images to add."""
    root = tmp_path / "photos"
    make_photos(root)
    out = tmp_path / "p.kidx"
    build(TinyEmbedder(), root, out)
    new = root / "new"
    new.mkdir()
    for i in range(3):
        noise(300 + i).save(new / f"new{i}.png")
    return root, out


def files_of(index_dir: Path) -> dict[str, tuple[int, int]]:
    """Data files of an index: name -> (inode, modification time in ns): what was written anew."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in index_dir.iterdir()
            if p.name not in (".lock", "meta.json")}


def meta_of(index_dir: Path) -> dict:
    return json.loads((index_dir / "meta.json").read_text())


def synthetic(n, dim, seed):
    v = np.random.default_rng(seed).standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------- what each writer writes

def test_add_writes_one_new_segment_and_leaves_every_old_file_as_it_was(gallery):
    root, out = gallery
    before = files_of(out)
    emb = TinyEmbedder()
    report = add_images(out, emb, root / "new", progress=False)
    after = files_of(out)
    assert report.indexed == 3 and emb.encoded == 3
    assert {n: after[n] for n in before} == before  # nothing old rewritten
    (new,) = set(after) - set(before)
    assert new.startswith("segment.") and pq.ParquetFile(out / new).metadata.num_rows == 3
    meta = meta_of(out)
    assert [s["rows"] for s in meta["segments"]] == [20, 3] and [s["start"] for s in meta["segments"]] == [0, 20]
    index = load_index(out, emb)
    assert index.count == 23 and index.segments == 2 and index.paths[-3:] == [f"new/new{i}.png" for i in range(3)]


def test_a_changed_file_is_marked_deleted_and_its_new_row_appended(gallery):
    root, out = gallery
    solid((0, 0, 255)).save(root / "grey.bmp")  # the grey picture is now blue
    before = files_of(out)
    emb = TinyEmbedder()
    assert add_images(out, emb, root / "grey.bmp", progress=False).indexed == 1
    written = set(files_of(out)) - set(before)
    assert sorted(n.split(".")[0] for n in written) == ["deleted", "segment"]
    index = load_index(out, emb)
    assert (index.count, index.deleted, index.stored_rows) == (20, 1, 21)
    assert index.paths.count("grey.bmp") == 1 and index.paths[-1] == "grey.bmp"
    assert index.search(emb.embed([solid((0, 0, 255))])[0], k=1)[0].path == "grey.bmp"


def test_remove_writes_only_a_deletion_file_and_compact_drops_the_rows(gallery):
    root, out = gallery
    before = load_index(out)
    old_files = files_of(out)
    kidx.remove_images(out, ["reds/red.png", "grey.bmp"])
    written = set(files_of(out)) - set(old_files)
    assert [n.split(".")[0] for n in written] == ["deleted"]
    table = pq.read_table(out / written.pop())
    segment = meta_of(out)["segments"][0]["name"]
    assert table.column("segment").to_pylist() == [segment, segment]
    assert table.column("row").to_pylist() == sorted([before.paths.index("grey.bmp"),
                                                      before.paths.index("reds/red.png")])
    index = load_index(out)
    assert index.paths == [p for p in before.paths if p not in ("reds/red.png", "grey.bmp")]
    kept = [before.paths.index(p) for p in index.paths]
    np.testing.assert_array_equal(index.vectors, before.vectors[kept])
    assert index.sha256 == [before.sha256[i] for i in kept]

    done = compact_index(out)
    assert done == kidx.Compacted(18, 2, 1)
    again = load_index(out)
    assert (again.segments, again.deleted, again.stored_rows) == (1, 0, 18) and again.paths == index.paths
    np.testing.assert_array_equal(again.vectors, index.vectors)
    assert sorted(p.name.split(".")[0] for p in out.iterdir() if p.name != ".lock") == ["meta", "segment"]
    assert compact_index(out) == kidx.Compacted(18, 0, 1)  # nothing left to do: nothing written


def test_an_add_that_brings_nothing_new_commits_nothing(gallery):
    root, out = gallery
    meta = (out / "meta.json").read_bytes()
    report = add_images(out, TinyEmbedder(), root / "reds", progress=False)
    assert report.indexed == 0 and (out / "meta.json").read_bytes() == meta


# ---------------------------------------------------------------- crash safety

def test_a_crash_between_writing_a_segment_and_the_commit_keeps_the_old_index(gallery, monkeypatch):
    root, out = gallery
    before = load_index(out)
    meta = (out / "meta.json").read_bytes()

    def die(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("koclip.index.ops._commit_meta", die)
    with pytest.raises(KeyboardInterrupt):
        add_images(out, TinyEmbedder(), root / "new", progress=False)
    monkeypatch.undo()
    stray = [p for p in out.glob("segment.*") if p.name not in meta.decode()]
    assert len(stray) == 1  # written, never committed
    assert (out / "meta.json").read_bytes() == meta
    index = load_index(out)
    assert index.paths == before.paths and index.count == 20
    # Running it again finishes from the journal (nothing embedded twice) and sweeps the stray file.
    second = TinyEmbedder()
    report = add_images(out, second, root / "new", progress=False)
    assert (report.indexed, report.resumed, second.encoded) == (3, 3, 0)
    assert not stray[0].exists() and load_index(out).count == 23


def test_a_crash_between_writing_a_deletion_file_and_the_commit_removes_nothing(gallery, monkeypatch):
    _, out = gallery
    monkeypatch.setattr("koclip.index.ops._commit_meta", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        remove_images(out, ["grey.bmp"])
    monkeypatch.undo()
    assert list(out.glob("deleted.*")) and load_index(out).count == 20
    assert remove_images(out, ["grey.bmp"]).count == 19
    assert len(list(out.glob("deleted.*"))) == 1


def test_a_crash_while_compacting_keeps_the_segments_and_deletions(gallery, monkeypatch):
    _, out = gallery
    remove_images(out, ["grey.bmp"])
    before = load_index(out)
    monkeypatch.setattr("koclip.index.ops._commit_meta", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compact_index(out)
    monkeypatch.undo()
    index = load_index(out)
    assert (index.deleted, index.paths) == (1, before.paths)


# ---------------------------------------------------------------- reading without koclip

def read_with_pyarrow(index_dir: Path) -> pa.Table:
    """The live rows of an index, in order, as the module docstring says to read them."""
    meta = json.loads((index_dir / "meta.json").read_text())
    dead: dict[str, set] = {}
    for d in meta["deletions"]:
        t = pq.read_table(index_dir / d["name"])
        for segment, row in zip(t.column("segment").to_pylist(), t.column("row").to_pylist()):
            dead.setdefault(segment, set()).add(row)
    tables = []
    for s in meta["segments"]:
        t = pq.read_table(index_dir / s["name"])
        keep = np.array([i not in dead.get(s["name"], ()) for i in range(t.num_rows)], bool)
        tables.append(t.filter(pa.array(keep)))
    return pa.concat_tables(tables)


def test_pyarrow_alone_reads_the_live_rows_in_order(gallery):
    root, out = gallery
    add_images(out, TinyEmbedder(), root / "new", progress=False)
    remove_images(out, ["greens/olive.png", "new/new1.png"])
    table = read_with_pyarrow(out)
    index = load_index(out)
    assert table.column("path").to_pylist() == index.paths
    assert table.column("sha256").to_pylist() == index.sha256
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert vectors.dtype == np.float16 and vectors.shape == (index.count, 16)
    np.testing.assert_array_equal(vectors, index.vectors)
    assert table.column("width").to_pylist() == index.widths
    info = json.loads(table.schema.metadata[b"koclip"])
    assert (info["model"], info["fingerprint"], info["dim"], info["dtype"]) == ("tiny", "tiny-v1", 16, "float16")


def test_a_name_that_is_not_utf8_keeps_its_bytes_in_path_bytes(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    solid((5, 5, 5)).save(root / name)
    solid((6, 6, 6)).save(root / "plain.png")
    build(TinyEmbedder(), root, tmp_path / "p.kidx")
    table = read_with_pyarrow(tmp_path / "p.kidx")
    assert table.column("path").to_pylist() == ["caf\ufffd.png", "plain.png"]
    assert table.column("path_bytes").to_pylist() == [b"caf\xe9.png", None]
    assert load_index(tmp_path / "p.kidx").paths == [name, "plain.png"]


# ---------------------------------------------------------------- format 1

def test_the_committed_format_1_gallery_loads_and_searches(tmp_path):
    index = load_index(GALLERY)
    assert (index.format_version, index.count, index.dim) == (1, 34, 768)
    hit = index.search(index.vectors[3].astype(np.float32), k=1, backend="exact")[0]
    assert hit.path == index.paths[3]


def test_writers_other_than_full_rewrites_refuse_format_1_and_name_upgrade(tmp_path):
    out = tmp_path / "v1.kidx"
    shutil.copytree(GALLERY, out)
    meta = (out / "meta.json").read_bytes()
    photo = tmp_path / "new.png"
    solid((1, 2, 3)).save(photo)
    for write in (lambda: remove_images(out, ["beach.jpg"]), lambda: compact_index(out),
                  lambda: add_images(out, None, [photo], progress=False)):
        with pytest.raises(IndexFileError, match=r"format 1.*koclip index upgrade .*v1.kidx"):
            write()
    assert (out / "meta.json").read_bytes() == meta


def test_upgrade_converts_format_1_keeping_every_row_and_setting(tmp_path):
    out = tmp_path / "v1.kidx"
    shutil.copytree(GALLERY, out)
    old = load_index(out)
    old_meta = meta_of(out)
    assert upgrade_index(out) is True
    new = load_index(out)
    assert new.format_version == 2 and new.segments == 1
    for column in ("paths", "sizes", "sha256", "widths", "heights"):
        assert getattr(new, column) == getattr(old, column)
    np.testing.assert_array_equal(new.vectors, old.vectors)
    meta = meta_of(out)
    for key in ("model", "fingerprint", "dim", "dtype", "count", "created", "images_root", "images_root_relative"):
        assert meta[key] == old_meta[key]
    assert sorted(p.name.split(".")[0] for p in out.iterdir() if p.name != ".lock") == ["meta", "segment"]
    assert upgrade_index(out) is False  # already format 2: nothing written
    assert remove_images(out, ["beach.jpg"]).count == 33


def test_upgrade_keeps_a_format_1_ivf_as_the_first_part(tmp_path):
    import faiss

    # A format-1 index with an IVF, as format 1 wrote it: files.ivf names a faiss file whose ids are rows.
    out = tmp_path / "v1.kidx"
    shutil.copytree(GALLERY, out)
    old = load_index(out)
    x = old.vectors.astype(np.float32)
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(768), 768, 2, faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add_with_ids(x, np.arange(34, dtype=np.int64))
    faiss.write_index(ivf, str(out / "ivf.0123456789ab.faiss"))
    meta = meta_of(out)
    meta["files"]["ivf"] = {"name": "ivf.0123456789ab.faiss", "bytes": (out / "ivf.0123456789ab.faiss").stat().st_size,
                            "crc32": kidx.format._crc32_file(out / "ivf.0123456789ab.faiss")}
    meta["ivf"] = {"type": "IVF-SQfp16", "nlist": 2, "nprobe": 1, "calibrated_recall_at_10": 1.0, "trained_on": 34,
                   "seed": 0, "build_seconds": 0.1}
    (out / "meta.json").write_text(json.dumps(meta))
    q = synthetic(5, 768, 1).astype(np.float32)
    before = [[h.path for h in r] for r in load_index(out).search(q, k=5, backend="faiss")]
    upgrade_index(out)
    meta = meta_of(out)
    assert meta["ivf"]["parts"] == [dict(meta["ivf"]["parts"][0], name="ivf.0123456789ab.faiss", start=0, stop=34)]
    assert [[h.path for h in r] for r in load_index(out).search(q, k=5, backend="faiss")] == before


# ---------------------------------------------------------------- metadata checks

@pytest.mark.parametrize("edit, message", [
    (lambda m: m["segments"][0].update(start=5), "starting at row id 5, expected 0"),
    (lambda m: m.update(count=m["count"] + 1), "count 21, but its segments hold 20 rows"),
    (lambda m: m["segments"][0].update(name="../elsewhere.parquet"), "naming a file inside the index"),
    (lambda m: m["segments"].append(dict(m["segments"][0], start=20)), "lists a segment twice|count"),
])
def test_inconsistent_format_2_metadata_is_reported(gallery, edit, message):
    _, out = gallery
    meta = meta_of(out)
    edit(meta)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=message):
        load_index(out)


def test_a_segment_of_another_model_is_refused(gallery, tmp_path):
    root, out = gallery
    other = tmp_path / "other.kidx"
    build(TinyEmbedder(fingerprint="tiny-v2"), root, other)
    mine, theirs = (meta_of(d)["segments"][0] for d in (out, other))
    shutil.copy(other / theirs["name"], out / mine["name"])
    meta = meta_of(out)
    meta["segments"][0].update(bytes=theirs["bytes"], footer_crc32=theirs["footer_crc32"])
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"holds vectors of model \('tiny', 'tiny-v2'\)"):
        load_index(out)


def test_a_corrupt_deletion_file_is_reported(gallery):
    _, out = gallery
    remove_images(out, ["grey.bmp"])
    p = next(out.glob("deleted.*"))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(IndexFileError, match="deletion file .* truncated or corrupt"):
        load_index(out)


# ---------------------------------------------------------------- several writers, one commit

def test_segments_written_by_several_writers_are_committed_at_once(gallery, tmp_path):
    _, out = gallery
    files = []
    for w in range(2):  # as two hosts (or Ray tasks) would, each its own file, knowing only the model
        v = synthetic(4, 16, w)
        items = {"path": [f"host{w}/{i}.jpg" for i in range(4)], "size": [1] * 4,
                 "sha256": [f"{w}{i}" * 32 for i in range(4)], "width": [2] * 4, "height": [3] * 4}
        files.append(tmp_path / f"part{w}.parquet")
        kidx.write_segment_file(files[-1], [(items, v)], dim=16, dtype="float16", model="tiny", fingerprint="tiny-v1")
    before = files_of(out)
    after = kidx.add_segments(out, files)
    assert after.count == 28 and after.paths[20:] == [f"host{w}/{i}.jpg" for w in range(2) for i in range(4)]
    assert all(f.exists() for f in files) and len(files_of(out)) == len(before) + 2
    assert load_index(out).paths == after.paths
    kidx.write_segment_file(tmp_path / "bad.parquet", [(items, v)], dim=16, dtype="float16", model="tiny",
                            fingerprint="another")
    with pytest.raises(IndexFileError, match="holds vectors of model"):
        kidx.add_segments(out, [tmp_path / "bad.parquet"])


# ---------------------------------------------------------------- the IVF: parts, tail, deletions, on disk

def ids_of(results):
    return [[h.path for h in r] for r in results]


# An IVF probing every list scores the same fp16 codes as exact search: both are float32 dots of 16
# terms with the same normalised query, each within gamma_16 of the true value (|score| <= 1 + U16).
SCORE_ATOL = reduction_rtol(16, depth=2) * (1 + U16)


def assert_same_hits(got, want):
    """The same top-k: equal scores (to SCORE_ATOL) at every rank, and equal paths wherever the
    exact scores leave no near-tie for the two searches to break differently."""
    for g, w in zip(got, want):
        assert len(g) == len(w)
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=0, atol=SCORE_ATOL)
        scores = [h.score for h in w]
        for i, h in enumerate(w):
            gaps = [abs(scores[i] - scores[j]) for j in (i - 1, i + 1) if 0 <= j < len(scores)]
            if all(gap > 2 * SCORE_ATOL for gap in gaps):
                assert g[i].path == h.path


@pytest.fixture
def vectors_index(tmp_path):
    """1200 clustered 16-d vectors with an IVF (16 lists)."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, 16))
    v = centres[rng.integers(0, 30, 1200)] + 0.5 * rng.standard_normal((1200, 16))
    out = tmp_path / "v.kidx"
    kidx.write_vectors_index(out, v, [f"{i:04d}" for i in range(1200)], model="tiny", fingerprint="tiny-v1",
                             faiss=True, images_root=tmp_path)
    return out, v, rng


def test_on_disk_ivf_memory_maps_its_lists_and_finds_what_the_in_memory_one_finds(vectors_index):
    import faiss

    out, v, rng = vectors_index
    q = rng.standard_normal((20, 16))
    in_memory = load_index(out, on_disk=False)
    on_disk = load_index(out, on_disk=True)
    assert on_disk._vectors is None  # nothing but the paths read
    a = in_memory.search(q, k=10, backend="faiss")
    b = on_disk.search(q, k=10, backend="faiss")
    assert a == b  # the same codes scanned the same way: identical paths and scores
    (part, _, _), = on_disk._load_ivf()[0]
    assert isinstance(faiss.downcast_InvertedLists(part.invlists), faiss.OnDiskInvertedLists)
    assert on_disk._vectors is None  # the IVF search read no vector
    assert on_disk.search(q, k=10, backend="exact") == in_memory.search(q, k=10, backend="exact")


def _mapped_rss(address: int) -> int:
    """Bytes of the mapping that starts at `address` resident in this process (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            rss = next(l for l in lines[i + 1:] if l.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_on_disk_ivf_hands_back_its_mapped_pages_past_the_limit(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    v = rng.standard_normal((20000, 64)).astype(np.float32)  # float32 lists: 5 MB, ~20 pages a list
    out = tmp_path / "m.kidx"
    kidx.write_vectors_index(out, v, [f"{i:05d}" for i in range(len(v))], model="tiny", fingerprint="tiny-v1",
                             faiss=True, images_root=tmp_path, dtype="float32")
    limit = 1 << 20
    index = load_index(out, on_disk=True, max_mapped=limit)
    index.search(v[0], k=5, backend="faiss", nprobe=1)
    (part, _, _), = index._load_ivf()[0]
    lists = faiss.downcast_InvertedLists(part.invlists)
    pages = index.mapped_pages
    assert pages.limit == limit and pages.releases == 0
    # What is counted as mapped covers what the searches really mapped, within the file's size.
    resident = _mapped_rss(int(lists.ptr))
    assert 0 < pages.mapped and resident <= pages.mapped + 2 * 4096  # the header pages read on loading
    one_list = int(pages._list_bytes.max())
    peak = 0
    for q in rng.standard_normal((60, 64)):
        index.search(q, k=5, backend="faiss", nprobe=4)
        peak = max(peak, _mapped_rss(int(lists.ptr)))
        assert pages.mapped <= limit
    assert pages.releases >= 2  # 60 queries x 4 of 128 lists visit most of the 5 MB file
    assert peak <= limit + 4 * one_list + 2 * 4096  # the limit plus one search's 4 lists
    # Unlimited, the same searches leave nearly the whole file mapped.
    unlimited = load_index(out, on_disk=True, max_mapped=1 << 40)
    for q in rng.standard_normal((60, 64)):
        unlimited.search(q, k=5, backend="faiss", nprobe=4)
    (part2, _, _), = unlimited._load_ivf()[0]
    assert _mapped_rss(int(faiss.downcast_InvertedLists(part2.invlists).ptr)) > 3 * limit
    assert unlimited.search(v[7], k=3, backend="faiss") == index.search(v[7], k=3, backend="faiss")


def test_load_index_refuses_a_negative_mapped_limit(vectors_index):
    with pytest.raises(ValueError, match="max_mapped"):
        load_index(vectors_index[0], max_mapped=-1)


def test_load_index_keeps_an_index_at_the_threshold_on_disk(vectors_index, monkeypatch):
    out, _, _ = vectors_index
    assert not load_index(out).on_disk
    monkeypatch.setattr(kivf, "ON_DISK_THRESHOLD", 1200)
    assert load_index(out).on_disk


def test_an_ivf_built_in_several_parts_searches_like_one(vectors_index, tmp_path, monkeypatch):
    out, v, rng = vectors_index
    monkeypatch.setattr(kivf, "PART_ROWS", 500)
    split = tmp_path / "split.kidx"
    kidx.write_vectors_index(split, v, [f"{i:04d}" for i in range(1200)], model="tiny", fingerprint="tiny-v1",
                             faiss=True, images_root=tmp_path)
    parts = meta_of(split)["ivf"]["parts"]
    assert [(p["start"], p["stop"]) for p in parts] == [(0, 500), (500, 1000), (1000, 1200)]
    q = rng.standard_normal((20, 16))
    # Every list probed: both give the exact top 10 of the same stored codes.
    nlist = meta_of(out)["ivf"]["nlist"]
    assert_same_hits(load_index(split).search(q, k=10, backend="faiss", nprobe=nlist),
                     load_index(out).search(q, k=10, backend="exact"))


def exact_top(index_dir, q, k=10):
    return load_index(index_dir).search(q, k=k, backend="exact")


def test_added_rows_are_searched_exactly_then_folded_into_a_new_part(vectors_index, tmp_path, monkeypatch):
    out, v, rng = vectors_index
    monkeypatch.setattr(kivf, "TAIL_ROWS", 5)
    nlist = meta_of(out)["ivf"]["nlist"]
    photos = tmp_path / "more"
    photos.mkdir()
    for i in range(4):
        noise(500 + i).save(photos / f"a{i}.png")
    add_images(out, TinyEmbedder(), photos, progress=False)
    assert len(meta_of(out)["ivf"]["parts"]) == 1  # 4 rows after the part: searched exactly, beside it
    q = np.concatenate([rng.standard_normal((5, 16)), TinyEmbedder().embed([noise(500 + i) for i in range(4)])])
    got = load_index(out).search(q, k=10, backend="faiss", nprobe=nlist)
    assert_same_hits(got, exact_top(out, q))
    assert [r[0].path for r in got[5:]] == [f"more/a{i}.png" for i in range(4)]
    for i in range(4, 6):
        noise(500 + i).save(photos / f"a{i}.png")
    add_images(out, TinyEmbedder(), photos, progress=False)
    parts = meta_of(out)["ivf"]["parts"]
    assert [(p["start"], p["stop"]) for p in parts] == [(0, 1200), (1200, 1206)]  # 6 > 5: a new part
    assert_same_hits(load_index(out).search(q, k=10, backend="faiss", nprobe=nlist), exact_top(out, q))


def test_small_parts_are_merged_once_there_are_too_many(vectors_index, tmp_path, monkeypatch):
    out, v, rng = vectors_index
    monkeypatch.setattr(kivf, "TAIL_ROWS", 0)
    monkeypatch.setattr(kivf, "MAX_PARTS", 3)
    photos = tmp_path / "more"
    photos.mkdir()
    spans = []
    for i in range(4):
        noise(600 + i).save(photos / f"b{i}.png")
        add_images(out, TinyEmbedder(), photos / f"b{i}.png", progress=False)
        spans.append([(p["start"], p["stop"]) for p in meta_of(out)["ivf"]["parts"]])
    assert spans == [[(0, 1200), (1200, 1201)], [(0, 1200), (1200, 1201), (1201, 1202)],
                     [(0, 1200), (1200, 1203)], [(0, 1200), (1200, 1203), (1203, 1204)]]
    q = rng.standard_normal((10, 16))
    assert_same_hits(load_index(out).search(q, k=10, backend="faiss", nprobe=16), exact_top(out, q))
    assert not [p for p in out.glob("ivf.*") if p.name not in (out / "meta.json").read_text()]


def test_deleted_rows_are_never_returned_by_the_ivf(vectors_index):
    out, v, rng = vectors_index
    q = v[:50] / np.linalg.norm(v[:50], axis=1, keepdims=True)
    remove_images(out, [f"{i:04d}" for i in range(0, 1200, 3)])
    index = load_index(out)
    assert index.ivf_params and index.deleted == 400
    nlist = index.ivf_params["nlist"]
    got = index.search(q, k=10, backend="faiss", nprobe=nlist)
    assert_same_hits(got, index.search(q, k=10, backend="exact"))
    assert not {h.path for r in got for h in r} & {f"{i:04d}" for i in range(0, 1200, 3)}
    # The on-disk IVF skips them the same way, and compaction fills the trained IVF with what is left.
    assert load_index(out, on_disk=True).search(q, k=10, backend="faiss", nprobe=nlist) == got
    trained = meta_of(out)["ivf"]["trained"]
    compact_index(out)
    meta = meta_of(out)
    assert meta["ivf"]["trained"] == trained and meta["ivf"]["parts"][0]["stop"] == 800
    assert_same_hits(load_index(out).search(q, k=10, backend="faiss", nprobe=nlist), got)


def test_an_ivf_built_on_demand_is_saved_as_format_2_files(tmp_path):
    v = synthetic(400, 8, 3)
    kidx.write_vectors_index(tmp_path / "v.kidx", v, [str(i) for i in range(400)], model="m", fingerprint="f")
    assert load_index(tmp_path / "v.kidx").search(v[0], k=1, backend="faiss")[0].path == "0"
    meta = meta_of(tmp_path / "v.kidx")
    assert (tmp_path / "v.kidx" / meta["ivf"]["trained"]["name"]).is_file()
    assert [(p["start"], p["stop"]) for p in meta["ivf"]["parts"]] == [(0, 400)]


# ---------------------------------------------------------------- the command line and the app

def test_cli_upgrades_compacts_informs_and_searches_format_2(tmp_path, monkeypatch, capsys):
    import koclip
    from koclip.cli import main

    class TextEmbedder(TinyEmbedder):
        def encode_texts(self, texts):  # a text "is" the picture of a colour
            colours = {"red": (230, 20, 20), "blue": (20, 30, 220)}
            return self.embed([solid(colours[t], (50, 50)) for t in texts])

    root = tmp_path / "photos"
    make_photos(root)
    monkeypatch.setattr(koclip, "load_embedder", lambda name: TextEmbedder(), raising=False)
    out = str(tmp_path / "p.kidx")
    assert main(["index", "build", "--model", "tiny", "--images", str(root), "--out", out, "--no-progress"]) == 0
    assert main(["index", "upgrade", out]) == 0
    assert "already format 2" in capsys.readouterr().out
    assert main(["index", "remove", out, "reds/red.png"]) == 0
    assert main(["index", "info", out]) == 0
    info = json.loads(capsys.readouterr().out.split("\n# ")[0].split("left\n")[-1])
    assert (info["format_version"], info["segments"], info["deleted_rows"], info["count"]) == (2, 1, 1, 19)
    assert main(["index", "search", out, "red", "-k", "2"]) == 0
    hits = capsys.readouterr().out.splitlines()
    assert hits[0] == "# red" and "reds/" in hits[1] and "reds/red.png" not in "".join(hits)
    assert main(["index", "compact", out]) == 0
    assert "19 images in 1 segment (was 1 segments; 1 deleted rows dropped)" in capsys.readouterr().out
    v1 = tmp_path / "v1.kidx"
    shutil.copytree(GALLERY, v1)
    assert main(["index", "remove", str(v1), "beach.jpg"]) == 2
    assert "koclip index upgrade" in capsys.readouterr().err
    assert main(["index", "upgrade", str(v1)]) == 0 and load_index(v1).format_version == 2


def test_a_search_after_another_process_compacted_the_index_says_to_load_it_again(vectors_index):
    out, v, rng = vectors_index
    remove_images(out, ["0001"])
    index = load_index(out)  # its faiss files are read on the first approximate search
    assert index.search(v[5], k=1, backend="exact")[0].path == "0005"
    compact_index(out)  # replaces every file the loaded index named
    with pytest.raises(IndexFileError, match="rewrote the index since it was loaded; load it again"):
        index.search(v[5], k=1, backend="faiss")
    assert index.search(v[5], k=1, backend="exact")[0].path == "0005"  # what it read stays usable


def test_the_apps_gallery_field_reads_a_format_2_index_and_a_format_1_one(gallery):
    from types import SimpleNamespace

    from koclip_app import support

    root, out = gallery
    add_images(out, TinyEmbedder(), root / "new", progress=False)
    remove_images(out, ["reds/red.png"])
    g = support.gallery_index(SimpleNamespace(embedder=TinyEmbedder()), out)  # a .kidx path typed in the field
    assert g.origin == "precomputed" and g.index.format_version == 2 and g.index.count == 22
    hits = g.index.search(TinyEmbedder().embed([solid((230, 20, 20), (50, 50))])[0], k=2)
    assert [h.path for h in hits] != [] and "reds/red.png" not in [h.path for h in hits]
    assert all(g.image_path(h.path).is_file() for h in hits)
    mini = SimpleNamespace(embedder=SimpleNamespace(name="koclip-mini", fingerprint=load_index(GALLERY).fingerprint,
                                                    dim=768))
    assert support.gallery_index(mini, GALLERY).index.count == 34


def test_write_vectors_index_takes_a_path_that_is_not_utf8(tmp_path):
    name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 file name, as os.listdir gives it
    out = tmp_path / "s.kidx"
    kidx.write_vectors_index(out, np.eye(3, 4), ["a.jpg", name, "b.jpg"], model="tiny", fingerprint="tiny-v1",
                             faiss=False, images_root=tmp_path)
    index = load_index(out)
    assert index.paths == ["a.jpg", name, "b.jpg"]
    assert index.search(np.eye(3, 4)[1], k=1)[0].path == name
