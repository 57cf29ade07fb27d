"""Tests for the Streamlit app (AppTest, from the entrypoint) and koclip_app.support.

Most page tests run a tiny random checkpoint written here (real code paths, meaningless
scores); the tests that check real results use koclip-mini and skip while it cannot load.
"""

import dataclasses
import html
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from streamlit.testing.v1 import AppTest

import koclip
from tiny_tokenizer import write_tiny_tokenizer
from koclip_app import support
from koclip.config import TINY
from koclip.data import gallery, gallery_dir
from koclip.errors import KoclipError
from koclip.index import build_index
from numerics import U16, reduction_rtol, unit_norm_atol

U64 = 2.0 ** -53  # float64 unit roundoff: KoCLIP.label_probabilities scores in float64

APP = str(Path(__file__).resolve().parent.parent / "app.py")
CAT = gallery_dir() / "cat_chelsea.jpg"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random KoCLIP checkpoint with its tokenizer, loadable by koclip.load(dir)."""
    directory = tmp_path_factory.mktemp("tiny_ckpt")
    koclip.save(koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)), directory)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def sigmoid_dir(tmp_path_factory):
    """A tiny random checkpoint scored as SigLIP is: sigmoid(scale * cosine + bias) per label."""
    directory = tmp_path_factory.mktemp("tiny_sigmoid")
    config = dataclasses.replace(TINY, scoring="sigmoid", logit_bias_init=-1.5)
    koclip.save(koclip.KoCLIP(config, rngs=nnx.Rngs(0)), directory)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("koclip_cache")


@pytest.fixture
def app(tiny_dir, cache, monkeypatch):
    """`app(page, model=tiny)` -> an AppTest started at the entrypoint, switched to `page`, run once."""
    monkeypatch.setenv("KOCLIP_CACHE", str(cache))
    monkeypatch.delenv("KOCLIP_ALLOW_PRIVATE_URLS", raising=False)

    def open_page(page=None, model=None):
        at = AppTest.from_file(APP, default_timeout=180)
        at.session_state["model"] = str(model or tiny_dir)
        at.run()
        if page:
            at.switch_page(page).run()
        return at

    return open_page


@pytest.fixture(scope="module")
def mini_engine():
    from koclip_app import ui

    try:
        return ui.shared_engine("koclip-mini")  # the app's shared cache: the AppTests reuse it
    except Exception as e:  # noqa: BLE001 - any failure means the model is not available here
        pytest.skip(f"koclip-mini does not load here ({type(e).__name__}: {e})")


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from koclip_app import ui

    return ui.shared_engine(str(tiny_dir))


def upload(at, name, data, mime):
    at.radio(key="i2t_source").set_value("업로드 / Upload").run()
    at.file_uploader(key="i2t_upload").upload(name, data, mime).run()
    return at


def ranked_lines(at):
    """The result (ui.score_bars): [(label, value text), ...] best first, as the list items read."""
    bodies = [h.value for h in at.html if "<ol" in h.value]
    assert bodies, f"no result on the page; errors: {[e.value for e in at.error]}"
    items = re.findall(r"<li[^>]*>.*?<b>(.*?)</b> — (.*?)</span>", bodies[-1])
    assert items, bodies[-1]
    return [(html.unescape(label), html.unescape(value)) for label, value in items]


def errors(at):
    return " ".join(e.value for e in at.error)


# ---------------------------------------------------------------- library side

def test_koclip_model_env_overrides_the_default():
    assert support.choose_default_model({"KOCLIP_MODEL": " /models/mine "}, probe=lambda t: False) \
        == ("/models/mine", None)


def test_default_is_koclip_mini_with_a_note_when_base_is_not_cached_and_the_hub_is_silent(hf_cache):
    probed = []
    choice = support.choose_default_model({}, probe=lambda t: probed.append(t) or False)
    assert choice.name == "koclip-mini" and "koclip-base" in choice.note and "offline" in choice.note
    assert probed == [3.0]


def test_default_is_koclip_base_when_the_hub_answers(hf_cache):
    assert support.choose_default_model({}, probe=lambda t: True).name == "koclip-base"


def test_default_is_koclip_base_when_its_files_are_cached(hf_cache, tmp_path):
    src = tmp_path / "snap"
    src.mkdir()
    for f in ("config.json", "flax_model.msgpack", "tokenizer.json"):
        (src / f).write_text("{}")
    hf_cache.put("koclip/koclip-base", src)
    assert support.choose_default_model({}, probe=lambda t: False).name == "koclip-base"


def test_labels_lose_blanks_and_repeats():
    assert support.prepare_labels("고양이\n\n 강아지 \n고양이\n  \n자동차") == \
        (["고양이", "강아지", "자동차"], ["고양이"], 2)


def test_fewer_than_two_distinct_labels_are_refused():
    with pytest.raises(KoclipError, match="at least 2 different labels.*got 1"):
        support.prepare_labels("고양이\n고양이\n")


def test_text_embeddings_are_computed_once_per_text(tiny_engine, monkeypatch):
    seen = []
    real = tiny_engine.embedder.encode_texts

    def spy(texts, *args, **kw):
        seen.extend(texts)
        return real(texts, *args, **kw)

    monkeypatch.setattr(tiny_engine.embedder, "encode_texts", spy)
    first = tiny_engine.texts(["사진 하나", "사진 둘"])
    second = tiny_engine.texts(["사진 둘", "사진 셋", "사진 하나"])
    assert seen == ["사진 하나", "사진 둘", "사진 셋"]
    np.testing.assert_array_equal(second[0], first[1])


def test_prompt_ensemble_is_the_renormalised_mean_over_templates(tiny_engine):
    z = tiny_engine.label_vectors(["고양이", "강아지"], ["이것은 {} 이다", "{} 사진"])
    a = tiny_engine.texts(["이것은 고양이 이다", "고양이 사진"]).mean(axis=0)
    # The same float32 mean, normalised twice (numpy's 1-D and row-wise norms may sum in other orders):
    # each within unit_norm_atol of the exact unit vector, entry by entry.
    dim = TINY.projection_dim
    np.testing.assert_allclose(z[0], a / np.linalg.norm(a), rtol=2 * unit_norm_atol(dim), atol=0)
    np.testing.assert_allclose(np.linalg.norm(z.astype(np.float64), axis=1), 1.0, rtol=0, atol=unit_norm_atol(dim))


def test_softmax_scores_sum_to_one_and_come_best_first(tiny_engine):
    ranked = tiny_engine.classify(Image.open(CAT), ["고양이", "강아지", "자동차"])
    # KoCLIP.label_probabilities, p / p.sum() in float64: the sum of 3 (gamma_3), the division (u) and
    # this sum of 3 (gamma_3 again); exp's own errors cancel.
    assert sum(r.score for r in ranked) == pytest.approx(1.0, abs=reduction_rtol(3, depth=2, u=U64) + U64)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


def shown_percent_atol(k: int) -> float:
    """|sum - 100| of k softmax scores shown as "12.3%": each is rounded to 0.1 (<= 0.05 off), a "<0.1%"
    (a score under 0.05 %) reads as 0.1 (<= 0.1 off) and all but the top one can be that, and the float64
    softmax sums to 1 within gamma_k + u."""
    return 0.1 * (k - 1) + 0.05 + 100 * (reduction_rtol(k, u=U64) + U64)


def photo_folder(root, n=3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (80 * i, 255 - 80 * i, 40)).save(root / f"p{i}.png")
    return root


def test_a_precomputed_index_of_the_same_model_and_photos_is_used(tiny_engine, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos")
    build_index(tiny_engine.embedder, photos, tmp_path / "emb" / "photos.kidx", progress=False)
    monkeypatch.setenv("KOCLIP_EMBEDDINGS_DIR", str(tmp_path / "emb"))
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    g = support.gallery_index(tiny_engine, photos)
    assert g.origin == "precomputed" and sorted(g.index.paths) == ["p0.png", "p1.png", "p2.png"]
    assert not (tmp_path / "cache").exists()


def test_the_committed_gallery_index_is_current_for_koclip_mini(mini_engine, tmp_path, monkeypatch):
    # Refitting mini's heads without rebuilding embeddings/ must not leave a stale index in use.
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KOCLIP_EMBEDDINGS_DIR", raising=False)
    g = support.gallery_index(mini_engine)
    assert g.origin == "precomputed", "embeddings/gallery-koclip-mini.kidx is stale: rebuild it (README)"
    fresh = np.asarray(mini_engine.embedder.encode_images([g.root / p for p in g.index.paths]), np.float64)
    stored = np.asarray(g.index.vectors, np.float64)
    cos = np.sum(stored * fresh, axis=1) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1))
    # Built on any CPU from the same photos, a stored vector differs from a fresh one by rounding alone:
    # the image path (lite0 and the ConSE head: <= 60 chained reductions of <= 1280 terms), fp16 storage
    # (U16) and the index's renormalisation, relative to |z| = 1.  Normalising both at most doubles the
    # difference d, and cos = 1 - |a - b|^2 / 2 for unit a, b.  Refitted heads move vectors further.
    d = 2 * (reduction_rtol(1280, depth=60) + U16 + 2 * unit_norm_atol(768))
    assert cos.min() >= 1 - d ** 2 / 2, \
        f"committed vector of {g.index.paths[int(cos.argmin())]} is off: cosine {cos.min():.7f}"


def test_a_gallery_is_built_once_then_rebuilt_when_a_photo_is_added(tiny_engine, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos")
    monkeypatch.setenv("KOCLIP_EMBEDDINGS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path / "cache"))
    calls = []
    assert support.gallery_index(tiny_engine, photos, progress=lambda d, t: calls.append((d, t))).origin \
        == "built"
    assert calls[-1] == (3, 3)
    assert support.gallery_index(tiny_engine, photos).origin == "cached"
    Image.new("RGB", (30, 30), (9, 9, 9)).save(photos / "new.png")
    g = support.gallery_index(tiny_engine, photos)
    assert g.origin == "built" and g.index.count == 4


def test_a_two_checkpoint_preset_is_cached_only_when_both_checkpoints_are(hf_cache, tmp_path):
    # mclip-b32 takes its text tower from M-CLIP and its image tower from CLIP: both must be cached.
    preset = koclip.registry.get("mclip-b32")

    def snapshot(name, files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
        return d

    hf_cache.put(preset.source, snapshot("text", ("config.json", "pytorch_model.bin", "sentencepiece.bpe.model")))
    assert not support.hub_model_cached("mclip-b32")
    hf_cache.put(preset.vision, snapshot("vision", ("config.json", "model.safetensors")))
    assert support.hub_model_cached("mclip-b32")


@pytest.mark.parametrize("files, cached", [(("config.json", "model.safetensors"), False),
                                           (("config.json", "model.safetensors", "spiece.model"), True)])
def test_a_sentencepiece_tokenizer_counts_as_cached(hf_cache, tmp_path, files, cached):
    d = tmp_path / "msiglip"
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    hf_cache.put("google/siglip-base-patch16-256-multilingual", d)
    assert support.hub_model_cached("msiglip-base") is cached


def test_a_large_photo_is_shown_as_a_display_size_jpeg_and_a_small_one_as_its_own_bytes():
    from koclip_app import ui

    big = Image.new("RGB", (3000, 2000), (30, 120, 200))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    shown = Image.open(io.BytesIO(ui.display_copy(buf.getvalue(), big)))
    assert shown.format == "JPEG" and shown.size == (ui.DISPLAY_PIXELS, round(ui.DISPLAY_PIXELS * 2 / 3))
    small = CAT.read_bytes()
    assert ui.display_copy(small, Image.open(CAT)) is small


# ---------------------------------------------------------------- pages (tiny model)

def test_intro_explains_the_models_prompting_and_local_use(app):
    at = app()
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.code)
    assert not at.exception
    assert at.title[0].value.startswith("KoCLIP")
    for name in koclip.available_models():
        assert f"`{name}`" in text
    assert "이것은 {} 이다" in text and "English works for simple words" in text
    assert "streamlit run app.py" in text


def test_image_to_text_shows_a_sigmoid_models_scores_as_independent_probabilities(app, sigmoid_dir):
    at = upload(app("pages/image_to_text.py", model=sigmoid_dir), "cat.jpg", CAT.read_bytes(), "image/jpeg")
    result = ranked_lines(at)
    assert not at.exception
    notes = " ".join(c.value for c in at.main.caption)
    assert "independent sigmoid probabilities" in notes and "Softmax over the labels" not in notes
    # What the page shows is the library's sigmoid score of each label (to its shown 0.1%).
    engine = support.load_engine(str(sigmoid_dir))
    labels = [label for label, _ in result]
    ranked = engine.classify(Image.open(CAT).convert("RGB"), labels)
    expected = {r.label: r.score for r in ranked}
    zimg = engine.image(Image.open(CAT).convert("RGB"))
    ztxt = engine.label_vectors(labels, ["이것은 {} 이다"])
    cosine = ztxt.astype(np.float64) @ zimg.astype(np.float64)  # the float64 arithmetic of label_probabilities
    sig = 1 / (1 + np.exp(-(engine.model.label_scale() * cosine - 1.5)))
    assert [expected[label] for label in labels] == pytest.approx(sig, rel=1e-9)
    for label, shown in result:
        assert float(shown.strip("<%")) == pytest.approx(expected[label] * 100, abs=0.05 + 1e-9)


def test_image_to_text_ranks_every_label_of_an_uploaded_photo(app):
    at = upload(app("pages/image_to_text.py"), "cat.jpg", CAT.read_bytes(), "image/jpeg")
    result = ranked_lines(at)
    assert sorted(label for label, _ in result) == sorted(["고양이", "강아지", "자동차", "커피", "산"])
    assert sum(float(v.strip("<%")) for _, v in result) == pytest.approx(100, abs=shown_percent_atol(len(result)))
    assert not at.exception
    assert not any("ImageNet" in c.value for c in at.main.caption)  # koclip-mini's note is for koclip-mini only


def test_the_sidebar_shows_the_active_model_and_where_its_weights_came_from(app, tiny_dir):
    at = app("pages/image_to_text.py")
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert f"Active: **{tiny_dir}**" in sidebar and "local folder" in sidebar
    assert at.sidebar.selectbox(key="model_select").value == str(tiny_dir)
    assert any("koclip-mini" in o for o in at.sidebar.selectbox(key="model_select").options)


def test_the_picked_model_survives_reruns_and_page_switches(app):
    # koclip-mini is not the first option, so a widget that lost its state would show another model.
    # (The home page, app.py, loads no model.)
    at = app(model="koclip-mini")
    at.run()
    at.switch_page("app.py").run()
    assert at.sidebar.selectbox(key="model_select").value == "koclip-mini"
    assert "koclip-mini" in " ".join(c.value for c in at.sidebar.caption)


def test_repeated_and_blank_labels_are_dropped_with_a_note(app):
    at = app("pages/image_to_text.py")
    at.text_area(key="i2t_labels").input("고양이\n\n강아지\n고양이\n").run()
    assert [label for label, _ in ranked_lines(at)] != [] and len(ranked_lines(at)) == 2
    note = " ".join(i.value for i in at.info)
    assert "repeated: 고양이" in note and "blank lines: 1" in note


def test_a_single_label_asks_for_at_least_two(app):
    at = app("pages/image_to_text.py")
    at.text_area(key="i2t_labels").input("고양이").run()
    assert "Enter at least 2 different labels" in errors(at) and not at.exception


def test_a_template_without_a_placeholder_is_explained(app):
    at = app("pages/image_to_text.py")
    at.text_input(key="i2t_template").input("고양이 사진").run()
    assert "has no '{}' where the label goes" in errors(at) and not at.exception


def test_without_softmax_the_scores_are_cosines(app):
    at = app("pages/image_to_text.py")
    at.checkbox(key="i2t_softmax").uncheck().run()
    values = [float(v) for _, v in ranked_lines(at)]
    assert all(-1 <= v <= 1 for v in values) and values == sorted(values, reverse=True)


def test_prompt_ensembling_still_ranks_every_label(app):
    at = app("pages/image_to_text.py")
    at.checkbox(key="i2t_ensemble").check().run()
    assert len(ranked_lines(at)) == 5 and not at.exception


def test_an_upload_that_is_not_an_image_is_refused_with_a_message(app):
    at = upload(app("pages/image_to_text.py"), "report.png", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "image/png")
    assert "'report.png'" in errors(at) and "PDF" in errors(at)
    assert not at.exception and not [h for h in at.html if "<ol" in h.value]


def test_a_truncated_upload_is_refused_with_a_message(app):
    at = upload(app("pages/image_to_text.py"), "half.jpg", CAT.read_bytes()[:3000], "image/jpeg")
    assert "truncated or corrupt" in errors(at) and not at.exception


def test_an_animated_gif_upload_is_read_from_its_first_frame(app):
    frames = [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    at = upload(app("pages/image_to_text.py"), "anim.gif", buf.getvalue(), "image/gif")
    assert len(ranked_lines(at)) == 5
    assert any("anim.gif · 64×48" in c for im in at.image for c in im.captions)


def test_an_unexpected_error_becomes_a_friendly_message_and_a_log_line(app, monkeypatch, caplog):
    def broken(self, *a, **kw):
        raise RuntimeError("internal detail that must not reach the page")

    monkeypatch.setattr(support.Engine, "classify", broken)
    with caplog.at_level(logging.ERROR, logger="koclip.app"):
        at = app("pages/image_to_text.py")
    assert "Something went wrong" in errors(at) and "internal detail" not in errors(at)
    assert not at.exception
    assert any("unexpected error in image to text" in r.getMessage() for r in caplog.records)


def test_a_loopback_url_is_refused_through_the_page(app, http_server, tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "green.png")
    at = app("pages/image_to_text.py")
    at.radio(key="i2t_source").set_value("URL").run()
    at.text_input(key="i2t_url").input(f"{http_server}/green.png").run()
    assert "127.0.0.1" in errors(at) and "loopback" in errors(at)
    assert not at.exception


def test_a_loopback_url_is_fetched_when_private_urls_are_allowed(app, http_server, tmp_path, monkeypatch):
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "blue.png")
    monkeypatch.setenv("KOCLIP_ALLOW_PRIVATE_URLS", "1")
    at = app("pages/image_to_text.py")
    at.radio(key="i2t_source").set_value("URL").run()
    at.text_input(key="i2t_url").input(f"{http_server}/blue.png").run()
    assert len(ranked_lines(at)) == 5 and not at.error


def test_text_to_image_shows_the_top_k_photos_of_the_bundled_gallery(app):
    at = app("pages/text_to_image.py")
    at.slider(key="t2i_k").set_value(5).run()
    captions = [c for im in at.image for c in im.captions]
    assert [c.split(".")[0] for c in captions] == ["1", "2", "3", "4", "5"]
    names = {p.path.name for p in gallery()}
    assert all(c.split(" · ")[0].split(". ", 1)[1] in names for c in captions)
    assert not at.exception


def test_text_to_image_searches_a_folder_given_by_path(app, tmp_path):
    photos = photo_folder(tmp_path / "mine")
    at = app("pages/text_to_image.py")
    at.text_input(key="t2i_folder").input(str(photos)).run()
    captions = [c for im in at.image for c in im.captions]
    assert sorted(c.split(" · ")[0].split(". ", 1)[1] for c in captions) == ["p0.png", "p1.png", "p2.png"]


def test_text_to_image_explains_a_missing_folder(app, tmp_path):
    at = app("pages/text_to_image.py")
    at.text_input(key="t2i_folder").input(str(tmp_path / "nowhere")).run()
    assert "does not exist" in errors(at) and not at.exception


def test_text_to_patch_shows_the_heatmap_and_every_cell_ranked(app):
    at = app("pages/text_to_patch.py")
    at.slider(key="t2p_rows").set_value(2).run()
    at.slider(key="t2p_cols").set_value(4).run()
    table = at.dataframe[0].value
    assert list(table["순위 / rank"]) == list(range(1, 9))
    assert sorted(zip(table["행 / row"], table["열 / column"])) == [(r, c) for r in (1, 2) for c in (1, 2, 3, 4)]
    assert any("2×4 · 1위 / best" in c for im in at.image for c in im.captions)
    assert not at.exception


# ---------------------------------------------------------------- real results (koclip-mini)

def test_mini_ranks_cat_first_for_the_uploaded_cat_photo(app, mini_engine):
    at = app("pages/image_to_text.py", model="koclip-mini")
    upload(at, "cat.jpg", CAT.read_bytes(), "image/jpeg")
    at.text_area(key="i2t_labels").input("강아지\n고양이\n자동차\n비행기").run()
    assert ranked_lines(at)[0][0] == "고양이"
    assert any("ImageNet" in c.value for c in at.main.caption)  # the model's limits, said under the result


def test_mini_finds_the_beach_and_the_cats_for_korean_queries(app, mini_engine):
    at = app("pages/text_to_image.py", model="koclip-mini")
    assert shown_photos(at)[0] == "beach.jpg"  # the default query: 모래사장과 바다가 있는 해변
    at.text_input(key="t2i_query").input("고양이").run()
    top = shown_photos(at)
    assert top[0] == "cat_chelsea.jpg" and "cat_mug.jpg" in top[:3]


def shown_photos(at):
    return [c.split(" · ")[0].split(". ", 1)[1] for im in at.image for c in im.captions]
