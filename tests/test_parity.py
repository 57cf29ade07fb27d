"""Parity with the reference implementations, per checkpoint format and tower kind.

The fixtures in tests/fixtures/parity and their reference outputs (golden.npz) were written by
scripts/make_parity_fixtures.py with transformers 4.57.6: its Flax dual encoder for KoCLIP's
`hybrid-clip` format, its PyTorch models for everything else.  Pixels are NHWC here; the script
transposed them for PyTorch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

import koclip
from koclip.formats.convert import flat_params
from koclip.loading import processor_for
from parity_helpers import PARITY, TOL, golden, loaded, max_diff

DUAL = ["hybrid_clip_clip", "hybrid_clip_vit", "dual_clip_safetensors", "dual_vit_safetensors", "dual_clip_bin"]
TEXT_TOWERS = ["roberta", "bert"]
VISION_TOWERS = ["clip_vision", "clip", "vit", "vit_classifier"]


@functools.cache
def towers(text: str, vision: str) -> koclip.KoCLIP:
    return koclip.from_towers(str(PARITY / "towers" / text), str(PARITY / "towers" / vision), projection_dim=16)


@pytest.mark.parametrize("name", DUAL)
def test_image_embeddings_match_reference(name):
    model, _ = loaded(name)
    g = golden(name)
    assert max_diff(model.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL


@pytest.mark.parametrize("name", DUAL)
def test_text_embeddings_match_reference(name):
    model, _ = loaded(name)
    g = golden(name)
    assert max_diff(model.encode_text(g["input_ids"], g["attention_mask"]), g["text_embeds"]) <= TOL


@pytest.mark.parametrize("name", ["hybrid_clip_clip", "dual_clip_safetensors"])
def test_text_embeddings_from_processor_match_reference(name):
    # The processor pads to a length bucket, not to the longest caption: padding must not matter.
    model, processor = loaded(name)
    g = golden(name)
    batch = processor(text=[str(t) for t in g["texts"]])
    assert batch["input_ids"].shape[1] != g["input_ids"].shape[1]
    assert max_diff(model.encode_text(batch["input_ids"], batch["attention_mask"]), g["text_embeds"]) <= TOL


def test_hybrid_clip_numbers_roberta_positions_from_zero_as_koclip_did():
    # hybrid-clip's Flax code passed positions 0..L-1; PyTorch's RobertaModel counts from pad_id + 1.
    assert loaded("hybrid_clip_clip")[0].config.text.positions == "arange"
    assert loaded("dual_clip_safetensors")[0].config.text.positions == "padding"


def _rows(ids, mask) -> list[list[int]]:
    return [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]


def test_processor_input_ids_match_reference_tokenizer():
    _, processor = loaded("hybrid_clip_clip")
    g = golden("hybrid_clip_clip")
    batch = processor(text=[str(t) for t in g["texts"]])
    assert _rows(batch["input_ids"], batch["attention_mask"]) == _rows(g["input_ids"], g["attention_mask"])


def test_processor_input_ids_match_transformers_autotokenizer():
    from transformers import AutoTokenizer

    _, processor = loaded("hybrid_clip_clip")
    texts = [str(t) for t in golden("hybrid_clip_clip")["texts"]]
    hf = AutoTokenizer.from_pretrained(str(PARITY / "hybrid_clip_clip"))
    batch = processor(text=texts)
    assert _rows(batch["input_ids"], batch["attention_mask"]) == hf(texts)["input_ids"]


def test_processor_pads_with_the_tokenizers_pad_id():
    # RoBERTa derives positions from the pad id: padding with another id would shift them.
    _, processor = loaded("hybrid_clip_clip")
    batch = processor(text=["이것은 고양이 이다"])
    assert set(batch["input_ids"][0][batch["attention_mask"][0] == 0].tolist()) == {1}


@pytest.mark.parametrize("text", TEXT_TOWERS)
def test_text_tower_matches_reference(text):
    model = towers(text, "clip_vision")
    g = golden(f"towers/{text}")
    hidden, pooled = model.text_model(g["input_ids"], g["attention_mask"])
    assert g["attention_mask"].min() == 0  # the batch has padding
    assert max_diff(hidden, g["last_hidden_state"]) <= TOL
    assert max_diff(pooled, g["pooler_output"]) <= TOL


@pytest.mark.parametrize("vision", VISION_TOWERS)
def test_vision_tower_last_hidden_state_matches_reference(vision):
    model = towers("roberta", vision)
    g = golden(f"towers/{vision}")
    hidden, _ = model.vision_model(g["pixel_values"])
    assert max_diff(hidden, g["last_hidden_state"]) <= TOL


@pytest.mark.parametrize("vision", ["clip_vision", "clip", "vit"])
def test_vision_tower_pooled_output_matches_reference(vision):
    model = towers("roberta", vision)
    g = golden(f"towers/{vision}")
    _, pooled = model.vision_model(g["pixel_values"])
    assert max_diff(pooled, g["pooler_output"]) <= TOL


def test_vit_classifier_checkpoint_keeps_the_initialised_pooler():
    model = towers("roberta", "vit_classifier")
    fresh = koclip.KoCLIP(model.config, rngs=nnx.Rngs(0))
    got = np.asarray(model.vision_model.pooler.dense.kernel[...])
    np.testing.assert_array_equal(got, np.asarray(fresh.vision_model.pooler.dense.kernel[...]))
    # ...while the rest of the tower was loaded.
    assert max_diff(model.vision_model.layernorm.scale[...], fresh.vision_model.layernorm.scale[...]) > 0.01


def test_from_towers_processor_uses_the_text_towers_tokenizer():
    model = towers("bert", "vit")
    g = golden("towers/bert")
    batch = processor_for(model)(text=[str(t) for t in g["texts"]])
    assert _rows(batch["input_ids"], batch["attention_mask"]) == _rows(g["input_ids"], g["attention_mask"])


def _assert_same_params(a: koclip.KoCLIP, b: koclip.KoCLIP):
    pa, pb = flat_params(a), flat_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


def test_koclip_format_round_trips_bit_exactly(tmp_path):
    model, processor = loaded("hybrid_clip_vit")
    out = koclip.save(model, tmp_path / "saved", processor)
    again, again_processor = koclip.load(str(out))
    assert again.config == model.config
    _assert_same_params(model, again)
    texts = ["이것은 고양이 이다", "a dog"]
    np.testing.assert_array_equal(again_processor.tokenize(texts)["input_ids"],
                                  processor.tokenize(texts)["input_ids"])


def test_koclip_format_round_trips_a_bert_model_made_from_towers(tmp_path):
    model = towers("bert", "vit_classifier")
    out = koclip.save(model, tmp_path / "saved")
    write_tokenizer(out)
    again, _ = koclip.load(str(out))
    assert again.config == model.config
    _assert_same_params(model, again)


def write_tokenizer(directory):
    # koclip.save writes weights and config only; the processor needs a tokenizer.
    from tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(directory)
