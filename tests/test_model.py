"""The dual encoder's contract: normalised embeddings, scaled logits, few compilations."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from koclip import model as model_lib
from koclip.config import TINY
from koclip.model import KoCLIP
from koclip.buckets import bucket
from koclip.processing import Processor, apply_template, clean_labels
from koclip.train import synthetic
from numerics import U32, reduction_rtol, unit_norm_atol

# Rounding bounds of the tiny model's float32 towers (tests/numerics.py), relative to |z| = 1 for its
# unit embeddings: a tower chains at most 30 reductions (2 layers of 11: two layer norms' means and
# variances, q/k/v, scores, softmax, weighted values, output, MLP in and out; plus the embeddings' or
# pre-layer norm, the final layer norm or pooler, the projection and the L2 norm).  The longest sums
# the vision tower's 3 * 8 * 8 patch pixels, and the text tower's 37-wide MLP.
VISION_RTOL = reduction_rtol(3 * TINY.vision.patch_size ** 2, depth=30)
TEXT_RTOL = reduction_rtol(TINY.text.intermediate_size, depth=30)


def assert_within(got, want, bound):
    """|got - want| <= bound entry by entry (bound broadcast)."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    excess = diff - bound
    assert np.all(excess <= 0), f"max |difference| {diff.max():.3g}; the worst entry is {excess.max():.3g} over"


@pytest.fixture(scope="module")
def tiny():
    return KoCLIP(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level tokenizer over Hangul syllables and ASCII: real, tiny, offline."""
    return synthetic.char_tokenizer(["abcdefghijklmnopqrstuvwxyz이것은고양강아지다의사진{} "])


def test_embeddings_are_unit_length(tiny):
    z = np.asarray(tiny.encode_image(np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)))
    assert z.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(z.astype(np.float64), axis=1), 1.0, rtol=0, atol=unit_norm_atol(16))


def test_padded_batch_gives_same_rows_as_unpadded(tiny):
    px = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    together = np.asarray(tiny.encode_image(px))
    alone = np.concatenate([np.asarray(tiny.encode_image(px[i:i + 1])) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=0, atol=VISION_RTOL)  # one batch of 3 against 3 of 1


def test_padding_tokens_do_not_change_text_embedding(tiny):
    ids = np.array([[0, 5, 6, 7, 2, 1, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    short = np.asarray(tiny.encode_text(ids[:, :5], mask[:, :5]))
    long = np.asarray(tiny.encode_text(ids, mask))
    np.testing.assert_allclose(short, long, rtol=0, atol=TEXT_RTOL)  # 5 tokens against 8, 3 of them padding


def test_logits_are_scaled_cosines(tiny):
    ids = np.array([[0, 5, 2], [0, 6, 2]], np.int32)
    mask = np.ones_like(ids)
    px = np.zeros((1, 32, 32, 3), np.float32)
    logits = np.asarray(tiny(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px)))
    zimg = np.asarray(tiny.encode_image(px))
    ztxt = np.asarray(tiny.encode_text(ids, mask))
    # The model encodes with the same compiled programs on the same inputs, so zimg and ztxt are the
    # same bits; what is left is the float32 scaled dot: gamma_16 of sum|zimg ztxt| <= 1, logit_scale's
    # rounding (u of it), exp (4u), the scaling (u), all relative to the scale.
    scale = np.exp(TINY.logit_scale_init)
    atol = scale * (reduction_rtol(16) + (abs(TINY.logit_scale_init) + 4 + 1) * U32)
    np.testing.assert_allclose(logits, scale * zimg @ ztxt.T, rtol=0, atol=atol)


def test_sessions_of_1_to_20_labels_compile_a_handful_of_times(tiny, char_tokenizer):
    processor = Processor(char_tokenizer, None, max_length=TINY.max_length)
    rng = np.random.default_rng(0)
    words = ["고양이", "강아지", "cat", "a dog", "사진", "abcdefghij"]
    before = model_lib.TRACES["encode_text"]
    for n in range(1, 21):
        labels = [" ".join(rng.choice(words, size=rng.integers(1, 4))) + str(i) for i in range(n)]
        batch = processor.tokenize(apply_template(labels, "이것은 {} 이다"))
        z = np.asarray(tiny.encode_text(batch["input_ids"], batch["attention_mask"]))
        assert z.shape == (n, 16)
    compiles = model_lib.TRACES["encode_text"] - before
    # 6 batch buckets (1..32) times at most 2 length buckets (16 and the max length).
    assert compiles <= 8, compiles


def test_bucket_rounds_up_and_extends_past_the_top():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]


def test_clean_labels_drops_blanks_and_duplicates():
    kept, dropped = clean_labels(["고양이", " ", "강아지", "고양이 ", "", "  새  "])
    assert kept == ["고양이", "강아지", "새"]
    assert len(dropped) == 3


def test_template_needs_a_placeholder():
    from koclip.errors import KoclipError

    assert apply_template(["개"], "{}의 사진") == ["개의 사진"]
    with pytest.raises(KoclipError, match="no '\\{\\}'"):
        apply_template(["개"], "사진")


def test_decomposed_hangul_tokenizes_like_composed(char_tokenizer):
    import unicodedata

    processor = Processor(char_tokenizer, None, max_length=16)
    composed = processor.tokenize(["고양이"])["input_ids"]
    decomposed = processor.tokenize([unicodedata.normalize("NFD", "고양이")])["input_ids"]
    np.testing.assert_array_equal(composed, decomposed)


@pytest.mark.parametrize("patch,use_bias", [(1, False), (8, True), (32, False)])
def test_patch_conv_is_the_valid_strided_convolution_as_a_matmul(patch, use_bias):
    from koclip.towers.layers import PatchConv, to_patches

    fast = PatchConv(3, 16, patch, use_bias=use_bias, rngs=nnx.Rngs(0))
    conv = nnx.Conv(3, 16, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=use_bias,
                    rngs=nnx.Rngs(0))
    if use_bias:
        fast.bias[...] = conv.bias[...] = np.arange(16, dtype=np.float32)
    x = np.random.default_rng(2).standard_normal((2, 2 * patch + patch // 2 + 1, 3 * patch, 3)).astype(np.float32)
    want, got = np.asarray(nnx.Conv.__call__(conv, x)), np.asarray(fast(x))  # a ragged edge row is dropped
    assert got.shape == want.shape == (2, 2 if patch > 1 else x.shape[1], 3, 16)
    # Both sum patch * patch * 3 products and add the bias in float32, each within gamma_(n+1) of
    # sum |x w| + |bias| for that output (tests/numerics.py).
    n = patch * patch * 3
    k = np.abs(np.asarray(conv.kernel[...], np.float64)).reshape(n, 16)
    magnitude = to_patches(np.abs(x.astype(np.float64)), (patch, patch)) @ k
    if use_bias:
        magnitude = magnitude + np.abs(np.asarray(conv.bias[...], np.float64))
    assert_within(got, want, reduction_rtol(n + 1, depth=2) * np.asarray(magnitude))
