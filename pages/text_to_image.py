"""Text to image: search a photo gallery with a sentence, over a precomputed embedding index."""

import os

import streamlit as st

from koclip_app import ui

COLUMNS = 4

with ui.page("text to image"):
    st.title("텍스트 → 이미지 / Text to image")
    st.caption("문장으로 갤러리에서 가장 잘 맞는 사진을 찾습니다. / Find the photos in a gallery that best match a sentence.")
    query = st.text_input("검색어 / Query", "모래사장과 바다가 있는 해변", key="t2i_query")
    k = st.slider("보여줄 사진 수 / Number of photos (top k)", 1, 12, 8, key="t2i_k")
    folder = ""
    if ui.custom_galleries_allowed():
        folder = st.text_input("내 갤러리: 이미지 폴더나 .kidx 인덱스 경로 (비우면 내장 갤러리) / Your gallery: a folder "
                               "of images or a .kidx index (empty: the bundled gallery)",
                               os.environ.get("KOCLIP_GALLERY", ""), key="t2i_folder").strip()
    engine = ui.engine()
    gallery = ui.gallery(engine, folder or None)
    if query.strip():
        hits = engine.search(gallery.index, query.strip(), k)
        st.caption(f"{gallery.index.count}장 중 상위 {len(hits)}장 / top {len(hits)} of {gallery.index.count} "
                   f"photos · 인덱스 / index: {gallery.origin}")
        for start in range(0, len(hits), COLUMNS):
            for col, hit in zip(st.columns(COLUMNS), hits[start:start + COLUMNS]):
                with col:
                    st.image(str(gallery.image_path(hit.path)), width="stretch",
                             caption=f"{hit.rank}. {hit.path} · {hit.score:.3f}")
    else:
        st.info("검색어를 입력하세요. / Enter a query.")
