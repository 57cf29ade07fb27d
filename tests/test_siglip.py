"""SigLIP and SigLIP 2 (fixed-resolution) checkpoints: parity with transformers, config, tokenizers.

The fixtures tests/fixtures/parity/siglip_spiece (SigLIP v1 layout: spiece.model) and siglip2_gemma
(SigLIP 2 layout: a Gemma tokenizer.json, a config.json that leaves defaults out) and their golden.npz
were written by scripts/make_siglip_fixtures.py with transformers 5.24's SiglipModel and its processor
(see there for what each array holds).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import koclip
from koclip import hub
from koclip.config import ModelConfig, TextConfig, VisionConfig
from koclip.data import gallery_dir
from koclip.errors import CheckpointError, ConfigError
from koclip.formats import safetensors_io
from koclip.formats.convert import flat_params
from koclip.images import open_image, preprocess
from koclip.loading import processor_for
from koclip.processing import Processor
from parity_helpers import PARITY, TOL, golden, loaded, max_diff

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = ["siglip_spiece", "siglip2_gemma"]


def texts(name: str) -> list[str]:
    return [str(t) for t in golden(name)["texts"]]


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("name", NAMES)
def test_processor_token_ids_equal_the_reference_processors(name):
    _, processor = loaded(name)
    g = golden(name)
    batch = processor(text=texts(name))
    np.testing.assert_array_equal(batch["input_ids"], g["input_ids"])
    assert batch["input_ids"].shape[1] == 64  # every text padded to the text tower's length
    # The reference processor returns no mask, so its model attends to the padding too: all ones.
    assert batch["attention_mask"].shape == g["input_ids"].shape and batch["attention_mask"].min() == 1
    assert (g["input_ids"][-1] != g["input_ids"][-1][-1]).any()  # the long text was truncated, not padded


@pytest.mark.parametrize("name", NAMES)
def test_processor_pixels_equal_the_reference_processors(name):
    _, processor = loaded(name)
    g = golden(name)
    pixels = processor(images=[gallery_dir() / str(f) for f in g["images"]])["pixel_values"]
    assert pixels.shape == g["pixel_values"].shape
    assert max_diff(pixels, g["pixel_values"]) <= 1e-6


@pytest.mark.parametrize("image", ["big", "rgba", "square224", "tall", "tiny", "wide"])
def test_siglip_preset_equals_transformers_pil_image_processor(image):
    # Resized up (tiny), down by > 2x (big), from odd shapes, at the published 224: the same floats.
    from transformers import SiglipImageProcessorPil

    im = open_image(FIXTURES / "images" / f"{image}.png")  # transparency composited on white, as koclip does
    ref = SiglipImageProcessorPil()(images=im, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(preprocess(im, "siglip"), ref)


@pytest.mark.parametrize("name", NAMES)
def test_image_embeddings_match_reference(name):
    model, _ = loaded(name)
    g = golden(name)
    assert max_diff(model.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_text_embeddings_from_the_processor_match_reference(name):
    model, processor = loaded(name)
    batch = processor(text=texts(name))
    got = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert max_diff(got, golden(name)["text_embeds"]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_text_tower_masks_padding_as_transformers_does_when_given_a_mask(name):
    model, _ = loaded(name)
    g = golden(name)
    assert g["masked_attention_mask"].min() == 0
    got = model.encode_text(g["input_ids"], g["masked_attention_mask"])
    assert max_diff(got, g["masked_text_embeds"]) <= TOL
    assert max_diff(got, g["text_embeds"]) > 1e-3  # the mask matters: the fixture tells them apart


@pytest.mark.parametrize("name", NAMES)
def test_logits_per_image_match_reference(name):
    model, processor = loaded(name)
    g = golden(name)
    batch = processor(text=texts(name))
    logits = model(batch["input_ids"], batch["attention_mask"], g["pixel_values"])
    assert max_diff(logits, g["logits_per_image"]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_label_probabilities_are_the_sigmoid_of_the_reference_logits(name):
    model, processor = loaded(name)
    g = golden(name)
    batch = processor(text=texts(name))
    p = model.label_probabilities(model.encode_image(g["pixel_values"]),
                                  model.encode_text(batch["input_ids"], batch["attention_mask"]))
    assert max_diff(p, 1 / (1 + np.exp(-g["logits_per_image"].astype(np.float64)))) <= TOL


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", NAMES)
def test_siglip_config_has_headless_towers_sigmoid_scoring_and_fixed_length_text(name):
    model, _ = loaded(name)
    c = model.config
    assert (c.text.kind, c.vision.kind) == ("siglip", "siglip")
    assert (c.text_head, c.vision_head, c.scoring) == ("none", "none", "sigmoid")
    assert model.text_projection is None and model.visual_projection is None
    assert c.projection_dim == c.vision.hidden_size == c.text.output_dim
    assert (c.max_length, c.text_padding, c.text_mask_padding, c.text_lowercase) == (64, "max_length", False, True)
    assert c.preprocess == "siglip"
    # logit_scale and logit_bias come from the checkpoint (the fixtures set log 8 and -2.5).
    assert float(model.logit_scale[...]) == pytest.approx(math.log(8.0), abs=1e-6)
    assert float(model.logit_bias[...]) == pytest.approx(-2.5, abs=1e-6)


def test_siglip2_text_head_is_narrower_than_its_tower():
    c = loaded("siglip2_gemma")[0].config
    assert (c.text.hidden_size, c.text.output_dim, c.vision.hidden_size) == (24, 16, 16)


def test_siglip2_style_config_takes_transformers_defaults_for_what_it_leaves_out():
    # google/siglip2-base-patch16-224's config.json names little more than the vocabulary.
    c = ModelConfig.from_hf({"model_type": "siglip",
                             "text_config": {"model_type": "siglip_text_model", "vocab_size": 256000},
                             "vision_config": {"model_type": "siglip_vision_model"}})
    t, v = c.text, c.vision
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
            t.max_position_embeddings, t.layer_norm_eps, t.hidden_act, t.output_dim) == (
        256000, 768, 12, 12, 3072, 64, 1e-6, "gelu_pytorch_tanh", 768)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.layer_norm_eps, v.hidden_act) == (
        224, 16, 768, 12, 1e-6, "gelu_pytorch_tanh")
    assert (c.projection_dim, c.max_length, c.tokenizer) == (768, 64, "")


def test_multilingual_siglip_config_reads_its_image_size():
    # google/siglip-base-patch16-256-multilingual's layout; null sub-configs take every default.
    c = ModelConfig.from_hf({"model_type": "siglip",
                             "text_config": {"model_type": "siglip_text_model", "vocab_size": 250000},
                             "vision_config": {"image_size": 256, "model_type": "siglip_vision_model"}})
    assert (c.text.vocab_size, c.vision.image_size, c.vision.num_patches) == (250000, 256, 256)
    bare = ModelConfig.from_hf({"model_type": "siglip", "text_config": None, "vision_config": None})
    assert (bare.projection_dim, bare.text.vocab_size, bare.vision.image_size) == (768, 32000, 224)


def test_siglip_vision_tower_without_its_head_is_refused():
    with pytest.raises(ConfigError, match="vision_use_head"):
        ModelConfig.from_hf({"model_type": "siglip", "vision_config": {"vision_use_head": False}})


def test_siglip_towers_of_different_widths_are_refused():
    with pytest.raises(ConfigError, match="projection_dim"):
        ModelConfig.from_hf({"model_type": "siglip", "text_config": {"projection_size": 512}})


def test_siglip_tower_configs_round_trip_through_to_hf():
    c = loaded("siglip2_gemma")[0].config
    assert TextConfig.from_hf(c.text.to_hf()) == c.text
    assert VisionConfig.from_hf(c.vision.to_hf()) == c.vision
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_unknown_text_padding_is_refused():
    with pytest.raises(ConfigError, match="text_padding"):
        ModelConfig(text_padding="longest")


def test_hub_downloads_spiece_model():
    assert "spiece.model" in hub.SMALL_FILES


# ---------------------------------------------------------------- processor


def test_siglip2_lowercases_before_its_gemma_tokenizer():
    _, processor = loaded("siglip2_gemma")
    a, b = processor(text=["A Photo of a CAT", "a photo of a cat"])["input_ids"]
    np.testing.assert_array_equal(a, b)
    processor.lowercase = False
    try:
        a, b = processor(text=["A Photo of a CAT", "a photo of a cat"])["input_ids"]
    finally:
        processor.lowercase = True
    assert (a != b).any()  # the Gemma tokenizer itself keeps case: the lowercasing is koclip's


@pytest.mark.parametrize("name", NAMES)
def test_max_length_padding_with_mask_padding_masks_only_the_padding(name):
    model, processor = loaded(name)
    masking = Processor(processor.tokenizer, processor.image_spec, max_length=64, padding="max_length",
                        mask_padding=True, lowercase=True)
    batch = masking(text=texts(name))
    np.testing.assert_array_equal(batch["input_ids"], golden(name)["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], golden(name)["masked_attention_mask"])


def test_processor_refuses_an_unknown_padding():
    with pytest.raises(koclip.KoclipError, match="padding"):
        Processor(None, None, padding="longest")


# ---------------------------------------------------------------- checkpoints


def _assert_same_params(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_koclip_format_round_trips_a_siglip_model_with_its_tokenizer(name, tmp_path):
    model, processor = loaded(name)
    out = koclip.save(model, tmp_path / "saved", processor)
    again, again_processor = koclip.load(str(out))
    assert again.config == model.config
    _assert_same_params(model, again)
    np.testing.assert_array_equal(again_processor(text=texts(name))["input_ids"], golden(name)["input_ids"])


def _copy(name: str, tmp_path) -> Path:
    d = tmp_path / name
    shutil.copytree(PARITY / name, d)
    return d


def test_a_tensor_of_the_wrong_shape_is_a_checkpoint_error(tmp_path):
    d = _copy("siglip_spiece", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["text_config"]["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"token_embedding.*shape \(192, 16\).*expects \(200, 16\)"):
        koclip.load(str(d))


def test_a_missing_tensor_is_a_checkpoint_error(tmp_path):
    d = _copy("siglip_spiece", tmp_path)
    items = [(n, x) for n, x in safetensors_io.iter_tensors(PARITY / "siglip_spiece" / "model.safetensors")
             if n != "vision_model.head.probe"]
    safetensors_io.write(d / "model.safetensors", items, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*head\.probe"):
        koclip.load(str(d))


def test_a_siglip_directory_without_a_tokenizer_is_a_checkpoint_error(tmp_path):
    d = _copy("siglip_spiece", tmp_path)
    (d / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        koclip.load(str(d))


def _split_towers(name: str, tmp_path, prefixed: bool) -> tuple[Path, Path]:
    """SiglipTextModel / SiglipVisionModel directories cut out of a SiglipModel fixture: transformers 5
    names their tensors `embeddings.*`, 4.x `text_model.embeddings.*` (prefixed)."""
    raw = json.loads((PARITY / name / "config.json").read_text())
    tensors = dict(safetensors_io.iter_tensors(PARITY / name / "model.safetensors"))
    dirs = []
    for side in ("text", "vision"):
        d = tmp_path / f"{name}_{side}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**raw[f"{side}_config"], "model_type": f"siglip_{side}_model"}))
        prefix = f"{side}_model."
        items = [(n if prefixed else n[len(prefix):], x) for n, x in tensors.items() if n.startswith(prefix)]
        safetensors_io.write(d / "model.safetensors", items, metadata={"format": "pt"})
        dirs.append(d)
    for f in (PARITY / name).iterdir():
        if f.name.startswith(("tokenizer", "spiece", "special_tokens")):
            shutil.copy(f, dirs[0])
    return dirs[0], dirs[1]


@pytest.mark.parametrize("prefixed", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_from_towers_reads_siglip_text_and_vision_models(name, prefixed, tmp_path):
    full, _ = loaded(name)
    text_dir, vision_dir = _split_towers(name, tmp_path, prefixed)
    model = koclip.from_towers(str(text_dir), str(vision_dir), projection_dim=8)
    c = model.config
    assert (c.preprocess, c.text_padding, c.text_mask_padding, c.text_lowercase, c.max_length) == (
        "siglip", "max_length", False, True, 64)
    g = golden(name)
    for part in ("text_model", "vision_model"):
        a, b = flat_params(getattr(model, part)), flat_params(getattr(full, part))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    batch = processor_for(model)(text=texts(name))
    np.testing.assert_array_equal(batch["input_ids"], g["input_ids"])
