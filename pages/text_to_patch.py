"""Text to patch: cut a photo into a grid and find the cell that best matches a text."""

import streamlit as st

from koclip.patches import heatmap_overlay
from koclip_app import ui

with ui.page("text to patch"):
    st.title("텍스트 → 패치 / Text to patch")
    st.caption("사진을 격자로 나누어 각 칸을 글과 비교합니다. 색이 밝을수록 더 잘 맞고, 가장 잘 맞는 칸은 빨간 테두리입니다. / "
               "Each grid cell is compared with the text: brighter is a better match; the best cell is outlined in red.")
    left, right = st.columns([2, 3], gap="large")
    with left:
        query = st.text_input("찾을 것 / Query", "고양이", key="t2p_query").strip()
        rows = st.slider("행 / Rows", 1, 8, 3, key="t2p_rows")
        cols = st.slider("열 / Columns", 1, 8, 3, key="t2p_cols")
        picked = ui.image_input("t2p", default_sample="cat_mug.jpg", preview=False)
    with right:
        if picked is not None and query:
            image, _ = picked
            ranked = ui.engine().patches(image, query, rows, cols)
            # A JPEG at display size: Streamlit would send a PNG (~120 ms to encode at 640x480), or a
            # quality-100 JPEG at the photo's full size.
            st.image(ui.display_jpeg(heatmap_overlay(image, ranked)), width="stretch",
                     caption=f"'{query}' · {rows}×{cols} · 1위 / best: {ui.cell_name(ranked[0], ranked)}")
            st.dataframe(ui.patch_table(ranked), hide_index=True, width="stretch",
                         column_config={"점수 / score": st.column_config.NumberColumn(format="%.3f")})
        elif picked is not None:
            st.info("찾을 것을 입력하세요. / Enter a query.")
