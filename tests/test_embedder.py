"""The Embedder: the one wrapper that encodes texts and images with a loaded model, and joins it to
the index (build from a folder, search by text)."""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import koclip
from koclip import embedder as embedder_lib
from koclip import index as kidx
from koclip import model as model_lib
from koclip.config import TINY
from koclip.embedder import Embedder, fingerprint
from numerics import U16, reduction_rtol, unit_norm_atol

# Rounding bounds of the tiny towers, relative to |z| = 1, when one input is encoded in another batch or
# with other padding (see test_model: 30 chained reductions, the longest over 3 * 8 * 8 patch pixels in
# the vision tower and the 37-wide MLP in the text tower).
VISION_RTOL = reduction_rtol(3 * TINY.vision.patch_size ** 2, depth=30)
TEXT_RTOL = reduction_rtol(TINY.text.intermediate_size, depth=30)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_tokenizer import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny") / "model"
    koclip.save(koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)), d)
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return koclip.load(str(tiny_dir))


@pytest.fixture
def rows_computed(monkeypatch):
    """{"image": [...], "text": [...]}: the row count of every call of the model's compiled encoders,
    padding included."""
    seen = {"image": [], "text": []}
    for kind in seen:
        real = getattr(model_lib, f"_encode_{kind}_jit")

        def record(model, first, *rest, real=real, kind=kind):
            seen[kind].append(int(np.shape(first)[0]))
            return real(model, first, *rest)

        monkeypatch.setattr(model_lib, f"_encode_{kind}_jit", record)
    return seen


def test_load_embedder_encodes_texts_and_images_to_unit_vectors(tiny_dir):
    emb = koclip.load_embedder(str(tiny_dir))
    zt = emb.encode_texts(["이것은 고양이 이다", "a dog"])
    zi = emb.encode_images([Image.new("RGB", (40, 30), "red")])
    assert zt.shape == (2, TINY.projection_dim) and zi.shape == (1, TINY.projection_dim)
    norms = np.linalg.norm(np.vstack([zt, zi]).astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=unit_norm_atol(TINY.projection_dim))
    assert emb.encode_texts([]).shape == (0, TINY.projection_dim)


def test_fingerprint_changes_with_preprocessing(tiny_dir):
    model, processor = koclip.load(str(tiny_dir))
    a = fingerprint(model, processor)
    assert a == Embedder(model, processor).fingerprint
    processor.image_spec = dataclasses.replace(processor.image_spec, mean=(0.5, 0.5, 0.5))
    assert fingerprint(model, processor) != a


def test_fingerprint_changes_with_the_weights_but_not_with_the_precision(tiny_dir, tmp_path):
    from tiny_tokenizer import write_tiny_tokenizer

    model, processor = koclip.load(str(tiny_dir))
    a = fingerprint(model, processor)
    # The same architecture with other weights (a fine-tuned copy, refitted heads) embeds elsewhere.
    other = tmp_path / "other"
    retrained = koclip.KoCLIP(TINY, rngs=nnx.Rngs(0))
    retrained.text_projection.kernel[...] = retrained.text_projection.kernel[...] * 1.01
    koclip.save(retrained, other)
    write_tiny_tokenizer(other)
    assert fingerprint(*koclip.load(str(other))) != a
    # bf16 vectors lie in the fp32 model's space: an index built with one serves the other.
    fast, _ = koclip.load(str(tiny_dir), precision="bf16")
    assert fingerprint(fast, processor) == a
    # A loaded model trained in place is no longer the model it was loaded as.
    model.text_projection.kernel[...] = model.text_projection.kernel[...] * 1.01
    assert fingerprint(model, processor) != a


def test_index_built_with_a_real_model_stores_its_vectors_and_ranks_by_them(tiny_dir, tmp_path):
    emb = koclip.load_embedder(str(tiny_dir))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"noise{i}.png")
    kidx.build_index(emb, photos, tmp_path / "photos.kidx", progress=False)
    index = kidx.load_index(tmp_path / "photos.kidx", emb)
    assert sorted(index.paths) == [f"noise{i}.png" for i in range(6)]
    direct = emb.encode_images([Image.open(photos / p) for p in index.paths])
    # One batch of 6 either way (build_index takes 32 at a time), encoded as chunks of 4 + 2 by the
    # same compiled encoders: the model's output is the same bits.  The index renormalises it
    # (2 unit_norm_atol(d)) and stores float16 (U16 relative; 2**-25 absolute for subnormals).
    d = TINY.projection_dim
    stored_rtol = U16 + 2 * unit_norm_atol(d)
    np.testing.assert_allclose(np.asarray(index.vectors, np.float32), direct, rtol=stored_rtol, atol=2.0 ** -25)
    q = emb.encode_texts(["이것은 고양이 이다"])
    hits = index.search(q, k=3)[0]
    # The tiny random model scores these images almost alike: compare scores, not the order of near-ties.
    # |q (stored - direct)| <= stored_rtol sum|q direct| <= stored_rtol (Cauchy-Schwarz, unit rows), the
    # query renormalised (2 unit_norm_atol(d)), two d-term float32 dots; the k-th largest moves no more.
    atol = stored_rtol + 2 * unit_norm_atol(d) + reduction_rtol(d, depth=2)
    np.testing.assert_allclose([h.score for h in hits], np.sort(direct @ q[0])[::-1][:3], rtol=0, atol=atol)
    assert [h.rank for h in hits] == [1, 2, 3]


def test_building_an_embedder_leaves_the_fingerprint_until_it_is_read(tiny, monkeypatch):
    model, processor = tiny
    calls = []
    monkeypatch.setattr(embedder_lib, "fingerprint", lambda m, p: calls.append(1) or fingerprint(m, p))
    emb = Embedder(model, processor)
    assert calls == []
    assert emb.fingerprint == fingerprint(model, processor) and emb.fingerprint == emb.fingerprint
    assert calls == [1]  # computed once, then kept


def test_encode_pixels_runs_batch_bucket_chunks_without_padding_rows(tiny, rows_computed):
    model, processor = tiny
    emb = Embedder(model, processor)
    side = TINY.vision.image_size
    pixels = np.random.default_rng(2).normal(size=(9, side, side, 3)).astype(np.float32)
    z = emb.encode_pixels(pixels)
    assert rows_computed["image"] == [8, 1]  # the model alone would pad 9 rows to 16
    assert z.dtype == np.float32 and z.shape == (9, TINY.projection_dim)
    alone = np.concatenate([emb.encode_pixels(pixels[i:i + 1]) for i in range(9)])
    # Each image in a chunk of 8 (or 1) against alone: another batch split, each entry within VISION_RTOL.
    np.testing.assert_allclose(z, alone, rtol=0, atol=VISION_RTOL)
    assert emb.encode_pixels(pixels[:0]).shape == (0, TINY.projection_dim)


def test_encode_texts_tokenizes_and_encodes_batch_size_texts_at_a_time(tiny, rows_computed):
    model, processor = tiny
    emb = Embedder(model, processor)
    texts = ["이것은 고양이 이다", "a dog", "빨간 자동차", "사진", "a much longer caption of a dog in a park"]
    z = emb.encode_texts(texts, batch_size=2)
    assert rows_computed["text"] == [2, 2, 1]
    assert z.dtype == np.float32 and z.shape == (5, TINY.projection_dim)
    # All five in one batch, padded to the longest of the five: other padding and another batch split,
    # each entry within TEXT_RTOL.
    np.testing.assert_allclose(z, emb.encode_texts(texts), rtol=0, atol=TEXT_RTOL)
    assert emb.encode_texts([], batch_size=2).shape == (0, TINY.projection_dim)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        emb.encode_texts(texts, batch_size=0)


def test_exact_chunks_are_the_largest_buckets_that_fit():
    from koclip.buckets import BATCH_BUCKETS, exact_chunks

    assert exact_chunks(9, BATCH_BUCKETS) == [8, 1]
    assert exact_chunks(70, BATCH_BUCKETS) == [32, 32, 4, 2]
    assert exact_chunks(32, BATCH_BUCKETS) == [32] and exact_chunks(0, BATCH_BUCKETS) == []
    assert exact_chunks(3, (4, 8)) == [3]  # below the smallest bucket: one chunk, padded by the model
