"""Streamlit pieces the pages share: the page frame (sidebar with the page links and the model
picker), the cached model, the image input, the score bars, the error guard.

app.py (the home page) and every file in pages/ run inside `with ui.page(...)`.  Model code
stays in koclip_app.support; this module only wires it to widgets.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import logging
import os

import pandas as pd
import streamlit as st

from koclip import registry
from koclip.data import gallery as sample_photos
from koclip.errors import FetchError, ImageError, KoclipError, OfflineError
from koclip.fetch import fetch_url
from koclip.images import open_image
from koclip.patches import grid_positions
from koclip_app import support

log = logging.getLogger("koclip.app")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "gif"]
MAX_UPLOAD_MB = 20
# Decoded size cap for uploads and URLs: a 5000x5000 photo passes, a decompression bomb does not.
MAX_PIXELS = 25_000_000
SOURCES = ("샘플 사진 / Sample photo", "업로드 / Upload", "URL")
MODEL_KEY = "model"  # session state: the model picked in the sidebar
# Process-wide: which models this server has loaded, for the sidebar (name -> LoadInfo).
LOADED: dict = {}


# ---------------------------------------------------------------- the page frame

# The sidebar's links, in order: (script relative to app.py, label, icon).  Streamlit's own list
# of pages is switched off (.streamlit/config.toml: client.showSidebarNavigation) for these labels.
PAGES = (
    ("app.py", "소개 / Introduction", ":material/home:"),
    ("pages/image_to_text.py", "이미지 → 텍스트 / Image to text", ":material/label:"),
    ("pages/text_to_image.py", "텍스트 → 이미지 / Text to image", ":material/image_search:"),
    ("pages/text_to_patch.py", "텍스트 → 패치 / Text to patch", ":material/grid_on:"),
)


@contextlib.contextmanager
def page(what: str):
    """Every page's frame: `with ui.page("image to text"): ...the page...`.

    Sets the page up, draws the sidebar (the links to the pages, the model picker),
    runs the page's body under `guard(what)`, then says in the sidebar which model
    is active and where its weights came from (by then the body has loaded it).
    """
    st.set_page_config(page_title="KoCLIP · 한국어 CLIP", page_icon="🔎", layout="wide")
    with st.sidebar:
        for script, label, icon in PAGES:
            st.page_link(script, label=label, icon=icon)
        info_slot = _model_picker()
    with guard(what):
        yield
    name = model_name()
    info = LOADED.get(name)
    with info_slot.container():
        if info is None:
            st.caption(f"**{name}** — 아직 불러오지 않음 / not loaded yet")
        else:
            plan = getattr(info, "precision", None)
            st.caption(f"사용 중 / Active: **{name}**  \n가중치 / Weights: {support.describe_source(info)}"
                       + (f"  \n정밀도 / Precision: {plan.summary()}" if plan else ""))


def _model_picker():
    """The sidebar's model select box; returns the empty slot under it for the model's details."""
    choice = default_choice()
    # The choice lives under its own key, not the widget's: each page has its own widget, and
    # Streamlit drops a widget's state when a page without it runs.
    current = st.session_state.setdefault(MODEL_KEY, choice.name)
    options = list(dict.fromkeys([*support.model_options(choice.name), current]))
    st.session_state[MODEL_KEY] = st.selectbox(
        "모델 / Model", options, index=options.index(current), key="model_select",
        format_func=lambda n: f"{n} (오프라인 / offline)" if registry.is_preset(n) and registry.get(n).offline else n,
        help="koclip-base/large는 허브에서 내려받고, koclip-mini는 인터넷 없이 동작합니다. / "
             "koclip-base/large download from the hub; koclip-mini runs offline.")
    if choice.note and st.session_state[MODEL_KEY] == choice.name:
        st.caption(choice.note)
    return st.empty()


# ---------------------------------------------------------------- the model

@st.cache_resource(show_spinner=False)
def default_choice() -> support.ModelChoice:
    """Decided once per server process (the hub probe takes up to 3 s)."""
    return support.choose_default_model()


@st.cache_resource(show_spinner=False, max_entries=2)
def shared_engine(name: str) -> support.Engine:
    # One Engine per model name for all sessions; Streamlit holds a per-key lock while
    # this runs, so two sessions asking at once load the model once.
    return support.load_engine(name)


def model_name() -> str:
    """The model picked in the sidebar (or the default before the sidebar has run)."""
    return st.session_state.get(MODEL_KEY) or default_choice().name


def engine() -> support.Engine:
    """The shared Engine of the selected model, loading it (with a spinner) on first use."""
    name = model_name()
    with st.spinner(f"모델 {name} 불러오는 중… / Loading {name}…"):
        e = shared_engine(name)
    LOADED[name] = e.info
    return e


# ---------------------------------------------------------------- errors

@contextlib.contextmanager
def guard(what: str):
    """Shows a KoclipError's message, and any other error as a friendly message plus a log
    line, instead of a traceback.  Streamlit's own rerun/stop signals pass through (BaseException)."""
    try:
        yield
    except KoclipError as e:
        # Library messages are in English; say in Korean what kind of problem it is.
        prefix = {FetchError: "URL에서 이미지를 가져오지 않았습니다. / ", ImageError: "이미지를 읽을 수 없습니다. / ",
                  OfflineError: "모델을 불러올 수 없습니다. / "}.get(type(e), "")
        st.error(prefix + str(e), icon=":material/error:")
    except Exception:  # noqa: BLE001 - the page must keep working; the log has the traceback
        log.exception("unexpected error in %s", what)
        st.error("예상하지 못한 오류가 났습니다. 입력을 바꿔 다시 해 보세요. / Something went wrong; "
                 "try another input. (자세한 내용은 서버 로그에 있습니다 / details are in the server log)",
                 icon=":material/error:")


# ---------------------------------------------------------------- image input

@st.cache_resource(show_spinner=False, max_entries=64)
def _sample(path: str):
    return open_image(path)


@st.cache_data(show_spinner=False, ttl=600, max_entries=32)
def _fetch(url: str) -> bytes:
    return fetch_url(url)


def image_input(key: str, default_sample: str = "cat_chelsea.jpg", preview: bool = True):
    """A sample photo, an upload or a URL -> (RGB PIL image, cache key), or None while there is none.

    preview: show the image under the input.

    Raises ImageError / FetchError (shown by `guard`) for files that are not images, too
    large, corrupt, or URLs that are refused.
    """
    source = st.radio("이미지 / Image", SOURCES, horizontal=True, key=f"{key}_source")
    if source == SOURCES[0]:
        photos = sample_photos()
        names = [p.path.name for p in photos]
        choice = st.selectbox(
            "샘플 사진 / Sample photo", names, key=f"{key}_sample",
            index=names.index(default_sample) if default_sample in names else 0,
            format_func=lambda n: f"{photos[names.index(n)].label_ko} / {photos[names.index(n)].label_en} ({n})")
        path = photos[names.index(choice)].path
        image, cache_key, caption, shown = _sample(str(path)), f"sample:{choice}", choice, str(path)
    elif source == SOURCES[1]:
        upload = st.file_uploader("이미지 파일 (PNG, JPEG, WebP, GIF) / Image file", type=UPLOAD_TYPES,
                                  key=f"{key}_upload", max_upload_size=MAX_UPLOAD_MB)
        if upload is None:
            st.info("이미지를 올려 주세요. / Upload an image.")
            return None
        cache_key, caption = "upload:" + upload.file_id, upload.name
        image, shown = _decoded(key, cache_key, upload.getvalue, upload.name)
    else:
        url = st.text_input("이미지 URL / Image URL", key=f"{key}_url",
                            placeholder="https://example.com/photo.jpg").strip()
        if not url:
            st.info("http(s) 이미지 주소를 입력하세요. / Enter an http(s) image address.")
            return None
        data = _fetch(url)
        cache_key, caption = "url:" + hashlib.sha256(data).hexdigest(), url
        image, shown = _decoded(key, cache_key, lambda: data, url[:200])
    if preview:
        # "content": the image's own width, but never wider than the column (a phone's, too).
        st.image(shown, caption=f"{caption} · {image.width}×{image.height}", width="content")
    else:
        st.caption(f"{caption} · {image.width}×{image.height}")
    return image, cache_key


def _decoded(key: str, cache_key: str, read, name: str):
    """(the RGB image, what to show of it) for an upload or a URL's bytes, made once per image and kept
    in this session: a big JPEG takes ~100 ms to decode, and Streamlit would otherwise send the whole
    file on every rerun (shrinking and re-encoding it on each one when it is wider than 1460 px)."""
    kept = st.session_state.get(f"{key}_decoded")
    if kept is None or kept[0] != cache_key:
        data = read()
        image = open_image(data, max_pixels=MAX_PIXELS, name=name)
        kept = (cache_key, image, display_copy(data, image))
        st.session_state[f"{key}_decoded"] = kept
    return kept[1], kept[2]


# The longest side an image is shown at: a column of the wide layout on a large screen, at 2x.
DISPLAY_PIXELS = 1024
DISPLAY_BYTES = 1_000_000


def display_copy(data: bytes, image):
    """The file's own bytes when a browser shows them as they are and they are small; else
    `display_jpeg(image)` (the page says the original's size in the caption)."""
    if _browser_can_show(data) and len(data) <= DISPLAY_BYTES and max(image.size) <= DISPLAY_PIXELS:
        return data
    return display_jpeg(image)


def display_jpeg(image) -> bytes:
    """An RGB image as a JPEG (quality 85) at most DISPLAY_PIXELS on its longest side.  Given a PIL image,
    st.image would encode it at its full size with quality 100."""
    if max(image.size) > DISPLAY_PIXELS:
        image = image.copy()
        image.thumbnail((DISPLAY_PIXELS, DISPLAY_PIXELS))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def _browser_can_show(data) -> bool:
    """Bytes in a format every browser displays (JPEG, PNG, GIF, WebP)."""
    head = bytes(data[:12])
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8")) or (head[:4] == b"RIFF" and head[8:] == b"WEBP")


# ---------------------------------------------------------------- results

BAR_COLOR = "#e4572e"  # the theme's primary colour (.streamlit/config.toml)


def score_bars(ranked, softmax: bool) -> None:
    """Labels best first, one line each: rank, label, the score written out, and the score as a bar.

    Plain HTML (st.html): a Vega-Lite chart made every browser load and run the chart library on
    each result, the heaviest part of the page (docs/app.md, "Under load").  Probabilities
    (softmax or SigLIP's sigmoid) are drawn on 0 to 100%; cosine similarities relative to the best.
    """
    if softmax:
        values = [f"{r.score * 100:.1f}%" if r.score >= 0.0005 else "<0.1%" for r in ranked]
        widths = [min(max(r.score, 0.0), 1.0) for r in ranked]
        unit = "확률 / probability"
    else:
        values = [f"{r.score:.3f}" for r in ranked]
        top = max((r.score for r in ranked), default=0.0)
        widths = [max(r.score, 0.0) / top if top > 0 else 0.0 for r in ranked]
        unit = "코사인 유사도 / cosine similarity (막대는 1위 대비 / bars relative to the first)"
    rows = "".join(
        f'<li style="margin:0 0 0.35rem 0"><div style="display:flex;align-items:center;gap:0.75rem">'
        f'<span style="flex:0 0 42%;overflow-wrap:anywhere"><b>{html.escape(r.label)}</b> — {html.escape(v)}</span>'
        f'<span style="flex:1 1 auto;height:0.9rem;border-radius:3px;background:rgba(128,128,128,0.18)">'
        f'<span style="display:block;height:100%;width:{w * 100:.1f}%;border-radius:3px;background:{BAR_COLOR}">'
        f"</span></span></div></li>"
        for r, v, w in zip(ranked, values, widths))
    st.html(f'<div style="font-size:0.8rem;opacity:0.7;margin-bottom:0.3rem">{unit}</div>'
            f'<ol style="margin:0;padding-left:1.6rem">{rows}</ol>')


def gallery(engine: support.Engine, folder: str | None):
    """The engine's index over `folder` (None: the bundled gallery), built with a progress bar on first use."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        text = f"갤러리 색인 중 / Indexing the gallery: {done}/{total}"
        if bar is None:
            bar = st.progress(0.0, text=text)
        bar.progress(done / max(total, 1), text=text)

    g = engine.gallery(folder, progress=progress)
    if bar is not None:
        bar.empty()
    return g


def patch_table(ranked):
    """rank_patches' output -> a table: rank, row, column, score, box."""
    pos = grid_positions(ranked)
    return pd.DataFrame({"순위 / rank": [p.rank for p in ranked],
                         "행 / row": [r for r, _ in pos], "열 / column": [c for _, c in pos],
                         "점수 / score": [round(p.score, 4) for p in ranked],
                         "상자 / box (l, t, r, b)": [str(p.box) for p in ranked]})


def cell_name(patch, ranked) -> str:
    row, col = grid_positions([patch, *ranked])[0]
    return f"{row}행 {col}열 / row {row}, column {col}"


def custom_galleries_allowed() -> bool:
    """Galleries from server paths: on by default locally, off on a Hugging Face Space (SPACE_ID set),
    where anyone could otherwise read and index folders of the server; KOCLIP_ALLOW_GALLERY_PATH=1 forces on."""
    if os.environ.get("KOCLIP_ALLOW_GALLERY_PATH", "").strip() == "1":
        return True
    return not os.environ.get("SPACE_ID")
