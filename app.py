"""KoCLIP demo, and its home page: what KoCLIP is, the models, what we learned about prompts
and languages, running it locally.

    streamlit run app.py            (KOCLIP_MODEL=koclip-mini or a checkpoint folder picks the model)

Streamlit's multipage mode: this file is the home page, each file in pages/ is one more page
(image to text, text to image, text to patch), and every page draws the same sidebar through
`koclip_app.ui.page`.
"""

import streamlit as st

from koclip import registry
from koclip_app import ui

with ui.page("introduction"):
    st.title("KoCLIP · 한국어 CLIP")
    st.markdown(
        "**KoCLIP**은 한국어 문장과 이미지를 같은 벡터 공간에 놓는 CLIP 모델입니다. 텍스트 인코더와 이미지 인코더가 "
        "각각 임베딩을 만들고, 두 임베딩의 코사인 유사도가 \"이 글이 이 그림을 얼마나 잘 설명하는가\"를 나타냅니다. "
        "그래서 학습하지 않은 라벨로도 사진을 분류하고(제로샷), 글로 사진을 찾고, 사진의 어느 부분이 글과 맞는지 "
        "찾을 수 있습니다.\n\n"
        "*KoCLIP is a CLIP model for Korean: a text encoder and an image encoder map captions and pictures into "
        "one vector space, where cosine similarity says how well a text describes an image. That gives zero-shot "
        "classification with any labels, text-to-image search, and finding the part of an image a text refers to.*")

    st.subheader("이 데모에서 할 수 있는 것 / What you can do here")
    st.markdown(
        "- **이미지 → 텍스트 / Image to text**: 사진 한 장과 한국어 라벨 몇 개로 제로샷 분류. "
        "*Zero-shot classification of a photo over labels you type.*\n"
        "- **텍스트 → 이미지 / Text to image**: 글로 갤러리에서 사진 찾기 (미리 계산한 임베딩 인덱스). "
        "*Search a photo gallery with a sentence, over a precomputed embedding index.*\n"
        "- **텍스트 → 패치 / Text to patch**: 사진을 격자로 나누고 글과 가장 잘 맞는 칸 찾기. "
        "*Cut a photo into a grid and find the cell that best matches a text.*")

    st.subheader("모델 / Models")
    rows = ["| 이름 / name | 가중치 / weights | 설명 / description | 라이선스 / licence |", "|---|---|---|---|"]
    for name in registry.available_models():
        p = registry.get(name)
        where = ("설치된 패키지, 오프라인 / installed packages, offline" if p.offline
                 else "허브 / hub " + " + ".join(f"`{s}`" for s in p.sources))
        rows.append(f"| `{name}` | {where} | {p.description} | {p.licence} |")
    st.markdown("\n".join(rows))
    st.caption("왼쪽 사이드바에서 모델을 고르세요. 허브에 연결할 수 없으면 koclip-mini가 기본입니다. / Pick a model "
               "in the sidebar; when the hub cannot be reached, koclip-mini is the default.")

    st.subheader("알게 된 것 / Findings")
    st.markdown(
        "원 KoCLIP 저자들이 koclip-base/large에서 관찰한 것: / *What KoCLIP's authors observed with "
        "koclip-base/large:*\n\n"
        "- **프롬프트가 도움이 됩니다.** 라벨만 쓰는 것보다 `이것은 {} 이다`처럼 문장에 넣으면 분류가 더 정확합니다. "
        "모델이 문장 형태의 캡션으로 학습되었기 때문입니다. 여러 템플릿의 평균(프롬프트 앙상블)은 결과를 더 안정적으로 "
        "만듭니다.  \n"
        "  *Prompting helps: putting a label into a sentence such as `이것은 {} 이다` (\"this is a {}\") classifies "
        "better than the bare word, since the models were trained on sentence-like captions; averaging several "
        "templates (prompt ensembling) makes results steadier.*\n"
        "- **간단한 영어 단어도 됩니다.** 텍스트 인코더가 영어 토큰을 일부 알고 있어 `cat`, `dog` 같은 쉬운 단어는 잘 "
        "맞히지만, 긴 영어 문장이나 드문 단어는 한국어보다 약합니다.  \n"
        "  *English works for simple words: the text encoders know enough English for words like `cat` or `dog`, "
        "but long English sentences and rare words do worse than Korean.*")
    st.markdown(
        "koclip-mini에서 잰 것 (내장 갤러리 34장, 라벨 39개, 제로샷 top-1): 한국어 라벨만 50.0%, `이것은 {} 이다` "
        "44.1%, 프롬프트 앙상블 47.1%; 영어 라벨만 55.9%, `a photo of a {}.` 55.9%, 앙상블 52.9%. 사진 한두 장 "
        "차이라 이 모델에서는 프롬프트의 효과가 뚜렷하지 않고, 영어가 한국어보다 조금 낫습니다.  \n"
        "*Measured with koclip-mini (the bundled 34-photo gallery, 39 labels, zero-shot top-1): Korean bare labels "
        "50.0%, `이것은 {} 이다` 44.1%, prompt ensemble 47.1%; English bare labels 55.9%, `a photo of a {}.` 55.9%, "
        "ensemble 52.9%. The differences are one or two photos: for this model prompts make no clear difference, "
        "and English does a little better than Korean.*")

    st.subheader("내 컴퓨터에서 실행하기 / Run it locally")
    st.code("git clone <this repository> && cd koclip\n"
            "make demo                      # 가상환경을 만들고 앱 실행 / creates .venv, then runs the app\n"
            "# 또는 / or:\n"
            "pip install -r requirements.txt && pip install -e .\n"
            "streamlit run app.py\n"
            "KOCLIP_MODEL=koclip-mini streamlit run app.py     # 모델 지정 / pick the model (a name or a folder)",
            language="bash")
    st.markdown(
        "파이썬에서 / In Python:")
    st.code('import koclip\n'
            'model, processor = koclip.load("koclip-mini")\n'
            'batch = processor(text=["이것은 고양이 이다", "이것은 강아지 이다"], images=["cat.jpg"])\n'
            'zimg = model.encode_image(batch["pixel_values"])\n'
            'ztxt = model.encode_text(batch["input_ids"], batch["attention_mask"])\n'
            'print(zimg @ ztxt.T)   # 코사인 유사도 / cosine similarities', language="python")
