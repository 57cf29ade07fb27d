"""KoCLIP demo: the frame.  Sets the page up, draws the sidebar (model picker), routes to pages/.

    streamlit run app.py            (KOCLIP_MODEL=koclip-mini or a checkpoint folder picks the model)
"""

import logging
import sys
from pathlib import Path

import streamlit as st

# `koclip_app` is imported by the pages; make the app folder importable however we are started.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from koclip import registry  # noqa: E402
from koclip_app import support  # noqa: E402
from koclip_app import ui  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
st.set_page_config(page_title="KoCLIP · 한국어 CLIP", page_icon="🔎", layout="wide")

nav = st.navigation([
    st.Page("pages/intro.py", title="소개 / Introduction", icon=":material/home:", default=True),
    st.Page("pages/image_to_text.py", title="이미지 → 텍스트 / Image to text", icon=":material/label:"),
    st.Page("pages/text_to_image.py", title="텍스트 → 이미지 / Text to image", icon=":material/image_search:"),
    st.Page("pages/text_to_patch.py", title="텍스트 → 패치 / Text to patch", icon=":material/grid_on:"),
])

with st.sidebar:
    choice = ui.default_choice()
    # The choice lives under its own key, not the widget's: Streamlit gives the sidebar's widgets
    # new ids after a server's very first run (see ui.ensure_frame), which would reset the widget.
    current = st.session_state.setdefault(ui.MODEL_KEY, choice.name)
    options = list(dict.fromkeys([*support.model_options(choice.name), current]))
    st.session_state[ui.MODEL_KEY] = st.selectbox(
        "모델 / Model", options, index=options.index(current), key="model_select",
        format_func=lambda n: f"{n} (오프라인 / offline)" if registry.is_preset(n) and registry.get(n).offline else n,
        help="koclip-base/large는 허브에서 내려받고, koclip-mini는 인터넷 없이 동작합니다. / "
             "koclip-base/large download from the hub; koclip-mini runs offline.")
    if choice.note and st.session_state[ui.MODEL_KEY] == choice.name:
        st.caption(choice.note)
    info_slot = st.empty()

with ui.frame():
    nav.run()

# After the page ran: by now it has loaded the model if it needed one.
name = ui.model_name()
info = ui.LOADED.get(name)
with info_slot.container():
    if info is None:
        st.caption(f"**{name}** — 아직 불러오지 않음 / not loaded yet")
    else:
        st.caption(f"사용 중 / Active: **{name}**  \n가중치 / Weights: {support.describe_source(info)}")
