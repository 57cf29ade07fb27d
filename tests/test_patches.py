"""Tests for koclip.patches: ranking grid cells against a text, and the heatmap overlay."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from transformers import PreTrainedTokenizerFast

from tiny_tokenizer import write_tiny_tokenizer
from koclip.config import TINY
from koclip.data import gallery_dir
from koclip.images import split_grid
from koclip.model import KoCLIP
from koclip.patches import OUTLINE, PatchScore, colormap, grid_positions, heatmap_overlay, rank_patches
from koclip.processing import Processor, image_spec_for
from numerics import reduction_rtol

# The tiny vision tower two ways (another batch split), relative to |z| = 1: 30 chained reductions of
# at most 3 * 8 * 8 terms (see test_model.VISION_RTOL).
VISION_RTOL = reduction_rtol(3 * TINY.vision.patch_size ** 2, depth=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random KoCLIP and its processor: real computations, meaningless scores."""
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="[PAD]",
                                  unk_token="[UNK]")
    return KoCLIP(TINY, rngs=nnx.Rngs(0)), Processor(tok, image_spec_for(TINY), max_length=TINY.max_length)


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_every_cell_is_ranked_once_best_first(tiny):
    model, processor = tiny
    ranked = rank_patches(model, processor, noise(50, 31), "고양이", rows=2, cols=3)
    assert [p.rank for p in ranked] == [1, 2, 3, 4, 5, 6]
    scores = [p.score for p in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sorted(p.box for p in ranked) == sorted(box for box, _ in split_grid(noise(50, 31), 2, 3))


def test_leftover_pixels_go_to_the_last_row_and_column(tiny):
    model, processor = tiny
    boxes = {p.box for p in rank_patches(model, processor, noise(50, 31), "사진", rows=2, cols=3)}
    # 50 = 3*16 + 2 and 31 = 2*15 + 1: the last column is 18 wide, the last row 16 high.
    assert (32, 15, 50, 31) in boxes and (0, 0, 16, 15) in boxes


def test_scores_are_cosines_between_each_crop_and_the_text(tiny):
    model, processor = tiny
    image = noise(40, 40, seed=3)
    ranked = rank_patches(model, processor, image, "빨간 자동차", rows=3, cols=3)  # 9 crops: encoded as 8 + 1
    batch = processor(text=["빨간 자동차"])
    ztxt = np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))[0]
    for p in ranked:
        zimg = np.asarray(model.encode_image(processor.preprocess_images([image.crop(p.box)])))[0]
        # The crop alone against the crops in chunks of 8 + 1: each entry of zimg within VISION_RTOL, so
        # the cosine within VISION_RTOL * sum|ztxt| (<= sqrt(16)), plus gamma_16 for each 16-term dot.
        atol = VISION_RTOL * float(np.abs(ztxt).sum()) + reduction_rtol(16, depth=2)
        assert p.score == pytest.approx(float(zimg @ ztxt), abs=atol)


def test_a_precomputed_query_vector_gives_the_same_ranking(tiny):
    model, processor = tiny
    image = noise(30, 30, seed=4)
    batch = processor(text=["강아지"])
    z = np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))[0]
    from_vector = rank_patches(model, processor, image, z, 3, 3)
    from_text = rank_patches(model, processor, image, "강아지", 3, 3)
    assert [p.box for p in from_vector] == [p.box for p in from_text]
    # The text's vector is what rank_patches computes from the text (same compiled program, same tokens):
    # the same crops scored against the same bits, so the same scores exactly.
    assert [p.score for p in from_vector] == [p.score for p in from_text]


def test_a_query_vector_of_the_wrong_size_is_refused(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="query embedding has 5 values; the model's embeddings have 16"):
        rank_patches(model, processor, noise(20, 20), np.ones(5), 2, 2)


def test_grid_sizes_outside_1_to_8_are_refused(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="rows must be an int from 1 to 8, got 9"):
        rank_patches(model, processor, noise(40, 40), "사진", 9, 2)


def test_grid_positions_count_rows_and_columns_from_the_top_left():
    ranked = [PatchScore((10, 5, 20, 10), 0.9, 1), PatchScore((0, 0, 10, 5), 0.5, 2),
              PatchScore((10, 0, 20, 5), 0.4, 3), PatchScore((0, 5, 10, 10), 0.1, 4)]
    assert grid_positions(ranked) == [(2, 2), (1, 1), (1, 2), (2, 1)]


def test_colormap_runs_from_dark_blue_to_yellow():
    c = colormap(np.array([0.0, 1.0, 2.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert tuple(c[0]) == (33, 42, 110) and tuple(c[1]) == (253, 231, 37) and tuple(c[2]) == tuple(c[1])


def test_overlay_outlines_the_best_patch_in_red():
    image = Image.new("RGB", (120, 60), (128, 128, 128))
    ranked = [PatchScore((60, 0, 120, 60), 0.8, 1), PatchScore((0, 0, 60, 60), 0.2, 2)]
    out = heatmap_overlay(image, ranked, numbers=False)
    assert out.size == image.size and out.mode == "RGB"
    assert out.getpixel((60, 30)) == OUTLINE and out.getpixel((119, 59)) == OUTLINE
    assert out.getpixel((59, 30)) != OUTLINE  # the other cell has no outline


def test_overlay_tints_better_patches_brighter():
    image = Image.new("RGB", (120, 60), (128, 128, 128))
    ranked = [PatchScore((60, 0, 120, 60), 0.8, 1), PatchScore((0, 0, 60, 60), 0.2, 2)]
    out = np.asarray(heatmap_overlay(image, ranked, numbers=False), np.float32)
    best, worst = out[30, 90], out[30, 30]
    assert best.sum() > 128 * 3 > worst.sum()


@pytest.fixture(scope="module")
def mini():
    from koclip_app import ui

    try:
        return ui.shared_engine("koclip-mini")  # the app's shared cache: one load per test process
    except Exception as e:  # noqa: BLE001 - any failure means the model is not available here
        pytest.skip(f"koclip-mini does not load here ({type(e).__name__}: {e})")


def test_mini_finds_the_cat_in_the_half_of_the_picture_that_shows_it(mini):
    cat = Image.open(gallery_dir() / "cat_chelsea.jpg").convert("RGB").resize((300, 300))
    coins = Image.open(gallery_dir() / "coins.jpg").convert("RGB").resize((300, 300))
    both = Image.new("RGB", (600, 300))
    both.paste(coins, (0, 0))
    both.paste(cat, (300, 0))
    ranked = rank_patches(mini.model, mini.processor, both, "고양이", rows=1, cols=2)
    assert ranked[0].box == (300, 0, 600, 300)
    ranked = rank_patches(mini.model, mini.processor, both, "동전", rows=1, cols=2)
    assert ranked[0].box == (0, 0, 300, 300)
