"""Image to text: zero-shot classification of one image over labels typed in Korean."""

import streamlit as st

from koclip_app import support
from koclip.processing import DEFAULT_TEMPLATE, KOREAN_TEMPLATES
from koclip_app import ui

DEFAULT_LABELS = "고양이\n강아지\n자동차\n커피\n산"
# koclip-mini learned pictures only through ImageNet's classes (README: 47-53% top-1 on the gallery).
# How the two kinds of model score labels (KoCLIP.label_probabilities), said under the result.
SOFTMAX_NOTE = ("소프트맥스: 라벨들이 확률을 나눠 가집니다 (합 100%). / Softmax over the labels: the scores compete "
                "and sum to 100%.")
SIGMOID_NOTE = ("이 모델(SigLIP)의 점수는 라벨마다 따로 계산한 시그모이드 확률입니다. 합이 100%가 아니며, 어느 라벨도 맞지 "
                "않거나 여럿이 맞을 수 있습니다. / This model (SigLIP) scores each label on its own: independent sigmoid "
                "probabilities that need not sum to 100%; none of the labels, or several, may fit.")
MINI_LIMITS = ("koclip-mini는 ImageNet 1000개 클래스를 통해서만 글과 그림을 맞춘 오프라인 모델이라, 그 밖의 대상"
               "(달, 은하, 사람, 도시 등)은 자주 틀립니다. / koclip-mini learned pictures only through ImageNet's "
               "1000 classes, so it often misses subjects outside them (the moon, a galaxy, people, a city).")

with ui.page("image to text"):
    st.title("이미지 → 텍스트 / Image to text")
    st.caption("사진을 고르고 라벨을 한 줄에 하나씩 적으면, 모델이 라벨을 점수순으로 정렬합니다. / "
               "Pick a photo and type labels, one per line; the model ranks them.")
    left, right = st.columns([1, 1], gap="large")
    with right:
        labels_text = st.text_area("라벨 (한 줄에 하나) / Labels, one per line", DEFAULT_LABELS, height=170,
                                   key="i2t_labels")
        use_template = st.checkbox("프롬프트 템플릿 사용 / Use a prompt template", value=True, key="i2t_use_template")
        template = st.text_input("템플릿 ({} 자리에 라벨) / Template ({} is the label)", DEFAULT_TEMPLATE,
                                 disabled=not use_template, key="i2t_template")
        ensemble = st.checkbox("프롬프트 앙상블 / Prompt ensembling", value=False, key="i2t_ensemble",
                               help="여러 한국어 템플릿의 평균 / average over these templates: "
                                    + ", ".join(f"`{t}`" for t in KOREAN_TEMPLATES))
        # The form shows before the model has loaded, so this label cannot depend on how it scores.
        softmax = st.checkbox("확률로 보기 / Show probabilities", value=True, key="i2t_softmax",
                              help="CLIP 계열: 라벨 간 소프트맥스, SigLIP: 라벨마다 시그모이드. 끄면 코사인 유사도 / "
                                   "CLIP-style models: a softmax over the labels; SigLIP: each label's own sigmoid; "
                                   "off: cosine similarities")
    with left:
        picked = ui.image_input("i2t")
    with right:
        labels, repeated, blanks = support.prepare_labels(labels_text)
        if repeated or blanks:
            parts = ([f"중복 / repeated: {', '.join(repeated)}"] if repeated else []) + \
                    ([f"빈 줄 / blank lines: {blanks}"] if blanks else [])
            st.info("제외한 라벨 / Dropped: " + "; ".join(parts))
        if picked is not None:
            image, key = picked
            engine = ui.engine()
            ranked = engine.classify(image, labels, template=template if use_template else None,
                                          ensemble=ensemble, softmax=softmax, image_key=key)
            st.subheader("결과 / Result")
            ui.score_bars(ranked, softmax)
            if softmax:
                st.caption(SIGMOID_NOTE if engine.model.scoring == "sigmoid" else SOFTMAX_NOTE)
            if ui.model_name() == "koclip-mini":
                st.caption(MINI_LIMITS)
